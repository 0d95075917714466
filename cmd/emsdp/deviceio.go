package main

import (
	"bufio"
	"cmp"
	"context"
	"encoding/csv"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/esro-emsdp/emsdp/emsd"
	"github.com/esro-emsdp/emsdp/store"
	"github.com/esro-emsdp/emsdp/store/open"
)

// The exchange format of "emsdp device import" and "export": CSV with a
// header naming the columns (any order; address required), or JSON lines
// with the same names. Aliases are separated by spaces in CSV. A row gives
// a password (hashed by import) or the hash of one (as export writes it),
// or neither for a device without a password; psk is a DTLS key in hex.
var deviceColumns = []string{"address", "password", "password_hash", "ip", "port", "mode", "version", "aliases",
	"psk", "require_dtls"}

// deviceRecord is one row as read or written.
type deviceRecord struct {
	Address      string   `json:"address"`
	Password     string   `json:"password,omitempty"`
	PasswordHash string   `json:"password_hash,omitempty"`
	IP           string   `json:"ip"`
	Port         int      `json:"port,omitempty"`
	Mode         string   `json:"mode,omitempty"`
	Version      string   `json:"version,omitempty"`
	Aliases      []string `json:"aliases,omitempty"`
	PSK          string   `json:"psk,omitempty"`
	RequireDTLS  bool     `json:"require_dtls,omitempty"`
}

// importRow is a record on its way to the store.
type importRow struct {
	line int
	rec  deviceRecord
	dev  *store.Device
	err  error
}

// importSummary counts what an import did.
type importSummary struct {
	read, added, updated atomic.Int64
	mu                   sync.Mutex
	refused              []importRefusal
}

type importRefusal struct {
	line int
	why  string
}

func (s *importSummary) refuse(line int, why string) {
	s.mu.Lock()
	s.refused = append(s.refused, importRefusal{line, why})
	s.mu.Unlock()
}

func deviceImport(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp device import", flag.ContinueOnError)
	var st deviceStore
	st.register(fs)
	format := fs.String("format", "", "csv or jsonl (default: by the file name's extension, else csv)")
	update := fs.Bool("update", false, "replace devices that exist (their delivery control stays); default: refuse them")
	batch := fs.Int("batch", 500, "rows per transaction (each row is written whole or refused alone)")
	writers := fs.Int("writers", 4, "transactions at once")
	pos, done, code := parseFlags(fs, env, args, -1)
	if done {
		return code
	}
	if len(pos) > 1 {
		return fail(env, usagef("one file at most (none or - for standard input)"))
	}
	if *writers < 1 || *batch < 1 {
		return fail(env, usagef("--writers and --batch must be at least 1"))
	}
	in, name := io.Reader(env.stdin), "-"
	if len(pos) == 1 && pos[0] != "-" {
		name = pos[0]
		f, err := os.Open(name)
		if err != nil {
			return fail(env, err)
		}
		defer f.Close()
		in = f
	}
	f, err := exchangeFormat(*format, name)
	if err != nil {
		return fail(env, err)
	}
	db, err := st.open(ctx, env, open.Create) // a registry moves into a new store too
	if err != nil {
		return fail(env, err)
	}
	defer db.Close()

	var sum importSummary
	start := time.Now()
	stopProgress := progress(env, func() string {
		return fmt.Sprintf("%d read, %d added, %d updated, %d refused", sum.read.Load(), sum.added.Load(), sum.updated.Load(),
			len(sum.refusedSnapshot()))
	})
	parsed := make(chan *importRow, 256)
	hashed := make(chan *importRow, 256)
	var readErr error
	go func() {
		defer close(parsed)
		readErr = readDevices(ctx, in, f, &sum, parsed)
	}()
	// Hashing (bcrypt, tens of milliseconds a password by design) on every
	// CPU; the rows stay independent, so their order does not matter.
	var hashers sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		hashers.Go(func() {
			for r := range parsed {
				if r.err == nil && r.rec.Password != "" {
					r.dev.PasswordHash, r.err = store.HashPassword(r.rec.Password)
				}
				hashed <- r
			}
		})
	}
	go func() {
		hashers.Wait()
		close(hashed)
	}()
	var writerWG sync.WaitGroup
	var writeErr error
	var errOnce sync.Once
	for range *writers {
		writerWG.Go(func() {
			rows := make([]*importRow, 0, *batch)
			flush := func() {
				if len(rows) == 0 || ctx.Err() != nil {
					rows = rows[:0]
					return
				}
				if err := writeBatch(ctx, db, rows, *update, &sum); err != nil {
					errOnce.Do(func() { writeErr = err })
				}
				rows = rows[:0]
			}
			for r := range hashed {
				if r.err != nil {
					sum.refuse(r.line, r.err.Error())
					continue
				}
				if rows = append(rows, r); len(rows) == *batch {
					flush()
				}
			}
			flush()
		})
	}
	writerWG.Wait()
	stopProgress()
	if readErr != nil {
		return fail(env, readErr)
	}
	if writeErr != nil {
		return fail(env, fmt.Errorf("%w (the rows of other batches and those listed below stay as reported)", writeErr))
	}
	if err := ctx.Err(); err != nil {
		return fail(env, err)
	}
	refused := sum.refusedSnapshot()
	slices.SortFunc(refused, func(a, b importRefusal) int { return a.line - b.line })
	for _, r := range refused {
		fmt.Fprintf(env.stdout, "refused line %d: %s\n", r.line, r.why)
	}
	fmt.Fprintf(env.stdout, "imported %d rows in %v: %d added, %d updated, %d refused\n", sum.read.Load(),
		time.Since(start).Round(time.Millisecond), sum.added.Load(), sum.updated.Load(), len(refused))
	if len(refused) > 0 {
		return exitFailed
	}
	return exitOK
}

func (s *importSummary) refusedSnapshot() []importRefusal {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.refused)
}

// writeBatch writes rows in one transaction (store.ImportDevices), each
// row whole or refused alone; an error is the whole batch failing, none
// of it written, and its rows are refused.
func writeBatch(ctx context.Context, db store.Registry, rows []*importRow, update bool, sum *importSummary) error {
	devs := make([]*store.Device, len(rows))
	for i, r := range rows {
		devs[i] = r.dev
	}
	res, err := db.ImportDevices(ctx, devs, update)
	if err != nil {
		for _, r := range rows {
			sum.refuse(r.line, "not written: "+err.Error())
		}
		return err
	}
	for i, r := range rows {
		a := emsd.Address(r.dev.Address)
		switch err := res[i].Err; {
		case err == nil && res[i].Updated:
			sum.updated.Add(1)
		case err == nil:
			sum.added.Add(1)
		case errors.Is(err, store.ErrExists) && strings.Contains(err.Error(), ": alias "):
			_, alias, _ := strings.Cut(err.Error(), ": alias ")
			sum.refuse(r.line, fmt.Sprintf("device %s: alias %s belongs to another device", a, alias))
		case errors.Is(err, store.ErrExists):
			sum.refuse(r.line, fmt.Sprintf("device %s exists (--update replaces it)", a))
		default:
			sum.refuse(r.line, fmt.Sprintf("device %s: %v", a, err))
		}
	}
	return nil
}

// exchangeFormat picks csv or jsonl.
func exchangeFormat(format, name string) (string, error) {
	switch {
	case format == "csv" || format == "jsonl":
		return format, nil
	case format != "":
		return "", usagef("--format %q: want csv or jsonl", format)
	case strings.HasSuffix(name, ".jsonl") || strings.HasSuffix(name, ".json"):
		return "jsonl", nil
	}
	return "csv", nil
}

// readDevices parses in and sends every row, valid or not, to out; it
// refuses repeats of an address or an alias within the input. The error
// is one that stops reading (not a bad row).
func readDevices(ctx context.Context, in io.Reader, format string, sum *importSummary, out chan<- *importRow) error {
	seenAddr := map[uint32]int{}
	seenAlias := map[string]int{}
	emit := func(r *importRow) {
		sum.read.Add(1)
		if r.err == nil {
			r.dev, r.err = recordDevice(r.rec)
		}
		if r.err == nil {
			if first, ok := seenAddr[r.dev.Address]; ok {
				r.err = fmt.Errorf("device %s repeats line %d", emsd.Address(r.dev.Address), first)
			}
		}
		if r.err == nil {
			for _, a := range store.NormalizeAliases(r.dev.Aliases) {
				if first, ok := seenAlias[a]; ok {
					r.err = fmt.Errorf("alias %s repeats line %d", a, first)
					break
				}
			}
		}
		if r.err == nil {
			seenAddr[r.dev.Address] = r.line
			for _, a := range store.NormalizeAliases(r.dev.Aliases) {
				seenAlias[a] = r.line
			}
		}
		out <- r
	}
	if format == "jsonl" {
		sc := bufio.NewScanner(in)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for line := 1; sc.Scan(); line++ {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			text := strings.TrimSpace(sc.Text())
			if text == "" || strings.HasPrefix(text, "#") {
				continue
			}
			r := &importRow{line: line}
			dec := json.NewDecoder(strings.NewReader(text))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&r.rec); err != nil {
				r.err = fmt.Errorf("not a device record: %v", err)
			} else if dec.More() {
				r.err = errors.New("more than one JSON value on the line")
			}
			emit(r)
		}
		return sc.Err()
	}
	cr := csv.NewReader(in)
	cr.FieldsPerRecord = -1
	cr.Comment = '#'
	header, err := cr.Read()
	if errors.Is(err, io.EOF) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("CSV header: %w", err)
	}
	col := map[string]int{}
	for i, h := range header {
		h = strings.ToLower(strings.TrimSpace(h))
		if !slices.Contains(deviceColumns, h) {
			return usagef("CSV header: unknown column %q (columns: %s)", h, strings.Join(deviceColumns, ","))
		}
		if _, dup := col[h]; dup {
			return usagef("CSV header: column %q twice", h)
		}
		col[h] = i
	}
	for _, req := range []string{"address"} {
		if _, ok := col[req]; !ok {
			return usagef("CSV header: column %q is required", req)
		}
	}
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		fields, err := cr.Read()
		if errors.Is(err, io.EOF) {
			return nil
		}
		line, _ := cr.FieldPos(0)
		r := &importRow{line: line}
		var pe *csv.ParseError
		switch {
		case errors.As(err, &pe):
			r.line, r.err = pe.StartLine, fmt.Errorf("CSV: %v", pe.Err)
			emit(r)
			continue
		case err != nil:
			return err
		case len(fields) != len(header):
			r.err = fmt.Errorf("%d fields, the header names %d", len(fields), len(header))
			emit(r)
			continue
		}
		get := func(name string) string {
			if i, ok := col[name]; ok {
				return strings.TrimSpace(fields[i])
			}
			return ""
		}
		r.rec = deviceRecord{Address: get("address"), Password: get("password"), PasswordHash: get("password_hash"),
			IP: get("ip"), Mode: get("mode"), Version: get("version"), Aliases: strings.Fields(get("aliases")), PSK: get("psk")}
		if p := get("port"); p != "" {
			if r.rec.Port, err = strconv.Atoi(p); err != nil {
				r.err = fmt.Errorf("port %q is not a number", p)
			}
		}
		if v := get("require_dtls"); v != "" && r.err == nil {
			if r.rec.RequireDTLS, err = strconv.ParseBool(v); err != nil {
				r.err = fmt.Errorf("require_dtls %q: want true or false", v)
			}
		}
		emit(r)
	}
}

// recordDevice validates a record as "device add" does its flags.
func recordDevice(rec deviceRecord) (*store.Device, error) {
	port := rec.Port
	if port == 0 {
		port = emsd.DefaultPort
	}
	d, err := deviceFromFlags(rec.Address, rec.IP, port, cmp.Or(rec.Version, "1.1"), cmp.Or(rec.Mode, "complete"), rec.Aliases)
	if err != nil {
		return nil, errors.New(strings.NewReplacer("--", "").Replace(err.Error()))
	}
	if rec.PSK != "" {
		if rec.PSK == "generate" {
			return nil, errors.New(`psk "generate": an import takes keys, it does not make them (emsdp device psk does)`)
		}
		if d.PSK, _, err = pskFlag(rec.PSK); err != nil {
			return nil, errors.New(strings.NewReplacer("--", "").Replace(err.Error()))
		}
	}
	d.RequireDTLS = rec.RequireDTLS
	switch {
	case d.RequireDTLS && d.PSK == nil:
		return nil, errors.New("require_dtls needs a psk")
	case rec.IP == "" && rec.Password == "" && rec.PasswordHash == "":
		return nil, errors.New("no ip and no password: a device without IP address is known by its password")
	case rec.Password != "" && rec.PasswordHash != "":
		return nil, errors.New("both password and password_hash: give one")
	case len(rec.Password) > store.MaxPassword:
		return nil, fmt.Errorf("password is %d octets, at most %d", len(rec.Password), store.MaxPassword)
	case rec.PasswordHash != "":
		if _, err := bcrypt.Cost([]byte(rec.PasswordHash)); err != nil {
			return nil, fmt.Errorf("password_hash is not a bcrypt hash: %v", err)
		}
		d.PasswordHash = rec.PasswordHash
	}
	return d, nil
}

func deviceExport(ctx context.Context, env *cmdEnv, args []string) int {
	fs := flag.NewFlagSet("emsdp device export", flag.ContinueOnError)
	var st deviceStore
	st.register(fs)
	format := fs.String("format", "csv", "csv or jsonl")
	pos, done, code := parseFlags(fs, env, args, -1)
	if done {
		return code
	}
	if len(pos) > 0 {
		return fail(env, usagef("unexpected argument %q (the registry goes to standard output)", pos[0]))
	}
	if *format != "csv" && *format != "jsonl" {
		return fail(env, usagef("--format %q: want csv or jsonl", *format))
	}
	db, err := st.open(ctx, env, open.ReadOnly)
	if err != nil {
		return fail(env, err)
	}
	defer db.Close()
	devs, err := db.Devices(ctx)
	if err != nil {
		return fail(env, err)
	}
	w := bufio.NewWriter(env.stdout)
	cw := csv.NewWriter(w)
	if *format == "csv" {
		cw.Write([]string{"address", "password_hash", "ip", "port", "mode", "version", "aliases", "psk", "require_dtls"})
	}
	enc := json.NewEncoder(w)
	for _, d := range devs {
		rec := deviceRecord{Address: emsd.Address(d.Address).String(), PasswordHash: d.PasswordHash,
			Port: int(d.Port), Mode: string(d.Mode), Version: d.Version, Aliases: d.Aliases,
			PSK: hex.EncodeToString(d.PSK), RequireDTLS: d.RequireDTLS}
		if d.IP.IsValid() {
			rec.IP = d.IP.String()
		}
		if *format == "csv" {
			cw.Write([]string{rec.Address, rec.PasswordHash, rec.IP, strconv.Itoa(rec.Port), rec.Mode, rec.Version,
				strings.Join(rec.Aliases, " "), rec.PSK, strconv.FormatBool(rec.RequireDTLS)})
			continue
		}
		if err := enc.Encode(rec); err != nil {
			return fail(env, err)
		}
	}
	cw.Flush()
	if err := cw.Error(); err != nil {
		return fail(env, err)
	}
	if err := w.Flush(); err != nil {
		return fail(env, err)
	}
	fmt.Fprintf(env.stderr, "exported %d devices\n", len(devs))
	return exitOK
}

// progress shows line() on the terminal, rewritten a few times a second,
// when standard error is one; the returned func clears it.
func progress(env *cmdEnv, line func() string) func() {
	f, ok := env.stderr.(*os.File)
	if !ok {
		return func() {}
	}
	if fi, err := f.Stat(); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				fmt.Fprintf(f, "\r\033[K")
				return
			case <-t.C:
				fmt.Fprintf(f, "\r\033[K%s", line())
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}
