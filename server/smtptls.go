package server

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// validSMTPTLS checks smtp.tls_cert, smtp.tls_key and smtp.require_tls,
// loading the key pair so that a bad file is a config error at start, not
// a failed handshake at the first STARTTLS.
func (c *Config) validSMTPTLS() error {
	s := c.SMTP
	switch {
	case s.TLSCert == "" && s.TLSKey == "":
		if s.RequireTLS {
			return configErr("smtp.require_tls needs smtp.tls_cert and smtp.tls_key")
		}
		return nil
	case s.TLSCert == "" || s.TLSKey == "":
		return configErr("smtp.tls_cert and smtp.tls_key: set both or neither")
	}
	if _, err := tls.LoadX509KeyPair(s.TLSCert, s.TLSKey); err != nil {
		return configErr("smtp.tls_cert %q, smtp.tls_key %q: %v", s.TLSCert, s.TLSKey, err)
	}
	return nil
}

// smtpCert is the inbound listener's certificate. It is swapped whole on
// reload, so the listener keeps running and each handshake uses one
// consistent certificate.
type smtpCert struct {
	log *slog.Logger
	cur atomic.Pointer[tls.Certificate]

	// mu makes each load one step, so that a Reload re-reading the files
	// cannot put back the old pair after a Reconfigure switched files.
	mu                sync.Mutex
	certFile, keyFile string // the files of cur
}

// load reads the key pair again; on failure the certificate in use stays.
func (c *smtpCert) load(now time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.loadLocked(c.certFile, c.keyFile, now)
}

// loadFiles switches to another key pair; on failure the certificate
// (and the files) in use stay.
func (c *smtpCert) loadFiles(certFile, keyFile string, now time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.loadLocked(certFile, keyFile, now)
}

func (c *smtpCert) loadLocked(certFile, keyFile string, now time.Time) error {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return fmt.Errorf("smtp certificate %s: %w", certFile, err)
	}
	c.cur.Store(&cert)
	c.certFile, c.keyFile = certFile, keyFile
	// LoadX509KeyPair fills Leaf. An expired certificate is still served
	// (clients decide), but it is worth a warning.
	if leaf := cert.Leaf; leaf != nil {
		lv := slog.LevelInfo
		if now.After(leaf.NotAfter) || now.Before(leaf.NotBefore) {
			lv = slog.LevelWarn
		}
		c.log.Log(context.Background(), lv, "smtp certificate loaded", "file", certFile, "subject", leaf.Subject.String(),
			"not_after", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// tlsConfig serves the current certificate; TLS 1.2 at least.
func (c *smtpCert) tlsConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return c.cur.Load(), nil
		},
	}
}
