package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/esro"
	"github.com/esro-emsdp/emsdp/mailconv"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/ua"
)

// flakyMaildir stores every delivery in a Maildir and then, for every
// fifth delivery it sees, answers with an error as if its RESULT had been
// lost: the server delivers that message again, and the Maildir must
// recognise the re-delivery.
type flakyMaildir struct {
	md     *ua.Maildir
	seen   atomic.Int64
	forced atomic.Int64
}

func (f *flakyMaildir) Deliver(ctx context.Context, d *ua.Delivery) error {
	if err := f.md.Deliver(ctx, d); err != nil {
		return err
	}
	if f.seen.Add(1)%5 == 0 {
		f.forced.Add(1)
		return errors.New("result lost")
	}
	return nil
}

// maildirDevice is device 198.037 on the endpoint it is registered at,
// storing into dir.
type maildirDevice struct {
	c *ua.Client
	h *flakyMaildir
}

// startReceiver starts the device's client on ep for server s. The
// endpoint outlives the client: the device comes back on the same socket
// for the next server (binding its port again once freed could find it
// taken).
func startReceiver(t *testing.T, s *Server, dir string, ep *esro.Endpoint) *maildirDevice {
	t.Helper()
	md, err := ua.OpenMaildir(dir, ua.MaildirConfig{Domain: "emsd.test"})
	must(t, err)
	h := &flakyMaildir{md: md}
	c, err := ua.New(ep, ua.Config{Server: s.Addrs().EMSD, Address: 198037, Handler: h, Logger: slog.New(slog.DiscardHandler)})
	must(t, err)
	return &maildirDevice{c: c, h: h}
}

func (r *maildirDevice) close() { r.c.Close() }

// Distinct messages are never merged (no message is lost because another
// looks like it): 96 identical Internet mails without Message-ID, 96
// identical ones reusing one Message-ID, and 96 identical submissions of
// another device through four programs (each starting its instance ids at
// 0), all to one device, half before and half after a server restart, with
// every fifth delivery's RESULT lost. The device's Maildir holds each
// message exactly once.
func TestDistinctMessagesNeverMerged(t *testing.T) {
	for _, sc := range storeConfigs {
		t.Run(sc.driver, func(t *testing.T) { testDistinctMessages(t, sc.config(t)) })
	}
}

func testDistinctMessages(t *testing.T, c *Config) {
	const half = 48 // per round and kind; four programs submit a quarter each
	dir := t.TempDir()
	rEP := listenESRO(t, "127.0.0.1")

	s1, err := Start(context.Background(), c, Options{Logger: testLogger(t)})
	must(t, err)
	closed := false
	defer func() {
		if !closed {
			s1.Close()
		}
	}()
	addDevice(t, s1, 198037, epAddr(rEP), deviceOpts{})
	addDevice(t, s1, 198036, closedUDP(t, "127.0.0.1"), deviceOpts{password: "pw"})

	delivered := 0 // deliveries the store must have finished
	round := func(s *Server) (dups uint64) {
		t.Helper()
		delivered += 3 * half
		r := startReceiver(t, s, dir, rEP)
		defer r.close()
		var wg sync.WaitGroup
		errs := make(chan error, 2*half+4)
		wg.Go(func() {
			for range half {
				errs <- sendMail(s, "monitor@example.com", []string{"198.037@emsd.test"},
					"From: monitor@example.com\r\nTo: 198.037@emsd.test\r\nSubject: disk full\r\n\r\nsda1 at 99%\r\n")
				errs <- sendMail(s, "monitor@example.com", []string{"198.037@emsd.test"},
					"From: monitor@example.com\r\nTo: 198.037@emsd.test\r\nSubject: load\r\n"+
						"Message-ID: <same@example.com>\r\n\r\nload 12\r\n")
			}
		})
		for p := range 4 {
			wg.Go(func() {
				ep := listenESRO(t, "127.0.0.1")
				c, err := ua.New(ep, ua.Config{Server: s.Addrs().EMSD, Address: 198036, Password: "pw", Logger: slog.New(slog.DiscardHandler),
					Handler: ua.HandlerFunc(func(context.Context, *ua.Delivery) error { return nil })})
				if err != nil {
					errs <- err
					return
				}
				defer c.Close()
				for range half / 4 {
					if _, err := c.Submit(context.Background(), &ua.Message{To: []string{"198.037"},
						Subject: "ping", Body: []byte("same text\n")}); err != nil {
						errs <- fmt.Errorf("program %d: %w", p, err)
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		var st store.Stats
		defer func() {
			if t.Failed() {
				t.Logf("store: %+v", st)
			}
		}()
		eventually(t, "every delivery done", func() bool {
			st = queueStats(t, s)
			return st.SubmissionsPending == 0 && st.Deliveries[store.DeliveryQueued] == 0 &&
				st.Deliveries[store.DeliveryInFlight] == 0 && st.Deliveries[store.DeliveryDelivered] >= delivered
		})
		if r.h.forced.Load() == 0 {
			t.Fatal("no re-delivery was forced")
		}
		return r.h.md.Stats().Duplicates
	}

	dups := round(s1)
	must(t, s1.Close())
	closed = true
	c.EMSD.Listen, c.SMTP.Listen = "127.0.0.1:0", "127.0.0.1:0"
	s2 := startServer(t, c)
	dups += round(s2)
	if dups == 0 {
		t.Error("the Maildir recognised no re-delivery")
	}

	files, err := os.ReadDir(filepath.Join(dir, "new"))
	must(t, err)
	subjects := map[string]int{}
	ids := map[string]string{}
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dir, "new", f.Name()))
		must(t, err)
		m, err := mail.ReadMessage(strings.NewReader(string(b)))
		must(t, err)
		subject, id := m.Header.Get("Subject"), m.Header.Get("Message-Id")
		subjects[subject]++
		switch {
		case subject == "load" && id != "<same@example.com>":
			t.Errorf("the sender's Message-ID was not kept: %q", id)
		case subject != "load" && ids[id] != "":
			t.Errorf("Message-ID %s on two messages (%s, %s)", id, ids[id], f.Name())
		}
		ids[id] = f.Name()
	}
	want := map[string]int{"disk full": 2 * half, "load": 2 * half, "ping": 2 * half}
	if fmt.Sprint(subjects) != fmt.Sprint(want) {
		t.Errorf("stored %v, want %v (%d re-deliveries recognised)", subjects, want, dups)
	}
}

// compat.rfc822_delivery_ids delivers Internet mail under the sender's
// Message-ID, as the reference MTS does, with nothing carried beside it.
func TestRFC822DeliveryIDs(t *testing.T) {
	c := testConfig(t)
	c.Compat.RFC822DeliveryIDs = true
	s := startServer(t, c)
	dev := newDevice(t, s, 198036, deviceOpts{})
	must(t, sendMail(s, "carol@example.com", []string{"198.036@emsd.test"}, inboundMsg("198.036@emsd.test", "compat", "x")))
	del := dev.next(t)
	if del.MessageID != emsd.RFC822ID("<compat@example.com>") || mailconv.SenderMessageID(del.IPM) != "" {
		t.Errorf("delivered as %s, carrying %q", del.MessageID, mailconv.SenderMessageID(del.IPM))
	}
}
