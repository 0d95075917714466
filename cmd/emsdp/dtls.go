package main

import (
	"crypto/subtle"
	"encoding/hex"
	"flag"
	"net/netip"
	"os"
	"strings"

	"github.com/esro-emsdp/emsdp/esro/esrodtls"
	"github.com/esro-emsdp/emsdp/store"
)

// dtlsFlags are the DTLS options of the ua and esro commands.
type dtlsFlags struct {
	on       bool
	psk      string
	pskFile  string
	identity string
	suites   string
}

func (f *dtlsFlags) register(fs *flag.FlagSet, withIdentity bool) {
	fs.BoolVar(&f.on, "dtls", false, "run ESRO over DTLS 1.2 with a pre-shared key (the server's dtls.listen port, 4641 by default)")
	fs.StringVar(&f.psk, "psk", "", "the DTLS pre-shared key in hex (as emsdp device add --psk printed it); prefer --psk-file")
	fs.StringVar(&f.pskFile, "psk-file", "", "file holding the DTLS pre-shared key in hex")
	fs.StringVar(&f.suites, "cipher-suites", "", "DTLS cipher suites by IANA name, comma-separated (default TLS_PSK_WITH_AES_128_CCM_8,TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256)")
	if withIdentity {
		fs.StringVar(&f.identity, "psk-identity", "", "the PSK identity to present (for EMSD, the device's address NNN.NNN)")
	}
}

// config returns the key and the transport settings; usage errors for
// missing or malformed values.
func (f *dtlsFlags) config() ([]byte, esrodtls.Config, error) {
	var cfg esrodtls.Config
	if !f.on {
		if f.psk != "" || f.pskFile != "" || f.identity != "" {
			return nil, cfg, usagef("--psk, --psk-file and --psk-identity need --dtls")
		}
		return nil, cfg, nil
	}
	if (f.psk == "") == (f.pskFile == "") {
		return nil, cfg, usagef("--dtls needs the key: --psk HEX or --psk-file FILE (one of them)")
	}
	text := f.psk
	if f.pskFile != "" {
		b, err := os.ReadFile(f.pskFile)
		if err != nil {
			return nil, cfg, err
		}
		text = string(b)
	}
	key, err := hex.DecodeString(strings.TrimSpace(text))
	if err != nil {
		return nil, cfg, usagef("DTLS key: not hex digits")
	}
	if len(key) < store.MinPSKLen || len(key) > store.MaxPSKLen {
		return nil, cfg, usagef("DTLS key of %d bytes: want %d..%d", len(key), store.MinPSKLen, store.MaxPSKLen)
	}
	if f.suites != "" {
		for _, name := range strings.Split(f.suites, ",") {
			id, err := esrodtls.ParseCipherSuite(strings.TrimSpace(name))
			if err != nil {
				return nil, cfg, usagef("--cipher-suites: %v", err)
			}
			cfg.CipherSuites = append(cfg.CipherSuites, id)
		}
	}
	return key, cfg, nil
}

// dtlsConn opens the transport: a listening one on local when listen is
// set (it accepts the one identity, and can open sessions too), else a
// client that opens sessions as it sends.
func dtlsConn(cfg esrodtls.Config, identity string, key []byte, listen bool, local string) (*esrodtls.Conn, error) {
	cfg.Credentials = func(netip.AddrPort) (string, []byte, error) { return identity, key, nil }
	if !listen {
		return esrodtls.NewClient(cfg)
	}
	cfg.PSK = func(id string) ([]byte, error) {
		if subtle.ConstantTimeCompare([]byte(id), []byte(identity)) != 1 {
			return nil, esrodtls.ErrUnknownIdentity
		}
		return key, nil
	}
	c, err := esrodtls.Listen("udp", local, cfg)
	if err != nil {
		return nil, listenHint(err, local)
	}
	return c, nil
}
