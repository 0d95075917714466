package ua

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/esro-emsdp/emsdp/gateway"
)

// Maildir is a Handler that stores each delivery as an RFC 5322 file
// (rendered by gateway.FormatIPM) in a Maildir: written to tmp/, synced,
// renamed into new/ and the directory synced, before Deliver returns, so
// that a delivery the MTS considers done is on disk.
type Maildir struct {
	dir    string
	domain string
	host   string
	count  atomic.Uint64
}

// NewMaildir opens (creating if needed) the Maildir at dir. Local EMSD
// addresses in the stored messages are written as hhh.lll@domain.
func NewMaildir(dir, domain string) (*Maildir, error) {
	if domain == "" {
		return nil, errors.New("ua: maildir: no domain for local addresses")
	}
	for _, sub := range []string{"tmp", "new", "cur"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("ua: maildir: %w", err)
		}
	}
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "localhost"
	}
	// Maildir names must not contain '/' or ':' (the info separator).
	host = strings.NewReplacer("/", `\057`, ":", `\072`).Replace(host)
	return &Maildir{dir: dir, domain: domain, host: host}, nil
}

// Deliver stores d; see Store.
func (m *Maildir) Deliver(_ context.Context, d *Delivery) error {
	_, err := m.Store(d)
	return err
}

// Store writes d into new/ and returns the file's path.
func (m *Maildir) Store(d *Delivery) (string, error) {
	msg, err := m.Format(d)
	if err != nil {
		return "", err
	}
	name := m.uniqueName(time.Now())
	tmp := filepath.Join(m.dir, "tmp", name)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("ua: maildir: %w", err)
	}
	_, err = f.Write(msg)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	final := filepath.Join(m.dir, "new", name)
	if err == nil {
		err = os.Rename(tmp, final)
	}
	if err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("ua: maildir: %w", err)
	}
	// The rename is durable only once the directory is.
	if err := syncDir(filepath.Join(m.dir, "new")); err != nil {
		return "", fmt.Errorf("ua: maildir: %w", err)
	}
	return final, nil
}

// Format renders d as the RFC 5322 message Store writes: the IPM through
// gateway.FormatIPM, dated by its submission time (else its delivery time),
// with the delivered message id as Message-ID (a local id as
// <EMSD.%08x.%08x@domain>, Open Point 10).
func (m *Maildir) Format(d *Delivery) ([]byte, error) {
	o := gateway.FormatOptions{Domain: m.domain, Date: d.SubmissionTime}
	if o.Date.IsZero() {
		o.Date = d.DeliveryTime
	}
	if d.MessageID.IsLocal {
		o.MessageID = fmt.Sprintf("<EMSD.%08x.%08x@%s>", uint32(d.MessageID.Local.SubmissionTime), d.MessageID.Local.Number, m.domain)
	} else {
		o.MessageID = d.MessageID.RFC822
	}
	out, err := gateway.FormatIPM(d.IPM, o)
	if err != nil {
		return nil, fmt.Errorf("ua: maildir: %w", err)
	}
	return out.Message, nil
}

// uniqueName follows the Maildir convention time.MusecPpidQn_Rrandom.host.
func (m *Maildir) uniqueName(now time.Time) string {
	var r [6]byte
	rand.Read(r[:])
	return fmt.Sprintf("%d.M%06dP%dQ%dR%s.%s", now.Unix(), now.Nanosecond()/1000, os.Getpid(), m.count.Add(1), hex.EncodeToString(r[:]), m.host)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
