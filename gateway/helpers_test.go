package gateway

import (
	"crypto/tls"
	"crypto/x509"
	"strings"
	"testing"

	"github.com/esro-emsdp/emsdp/internal/testcert"
)

// selfSigned returns a server certificate for 127.0.0.1/localhost and a
// pool that trusts it.
func selfSigned(t testing.TB) (tls.Certificate, *x509.CertPool) {
	c := testcert.New(t, "gateway test")
	return c.TLS, testcert.Pool(c)
}

// crlfText turns a readable LF test mail into CRLF.
func crlfText(s string) string { return strings.ReplaceAll(s, "\n", "\r\n") }
