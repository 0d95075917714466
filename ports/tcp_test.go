package ports

import (
	"context"
	"strings"
	"testing"
)

func TestClassifyBanner(t *testing.T) {
	tests := []struct {
		banner, service, ident string
	}{
		{"SSH-2.0-OpenSSH_9.6\r\n", ServiceBanner, `SSH server ("SSH-2.0-OpenSSH_9.6")`},
		{"220 mx.example ESMTP Postfix\r\n", ServiceBanner, "SMTP server"},
		{"220 (vsFTPd 3.0.5)\r\n", ServiceBanner, "FTP server"},
		{"220 ready\r\n", ServiceBanner, "SMTP or FTP server"},
		{"+OK POP3 ready\r\n", ServiceBanner, "POP3 server"},
		{"* OK IMAP4rev1\r\n", ServiceBanner, "IMAP server"},
		{"RFB 003.008\n", ServiceBanner, "VNC server"},
		{"@PJL USTATUS DEVICE\r\n", ServicePrinter, "print service"},
		{"HP JetDirect ready\r\n", ServicePrinter, "print service"},
		{"lpd: your host does not have line printer access\n", ServicePrinter, "print service"},
		{"welcome to the helpdesk\r\n", ServiceUnknown, "unrecognised text banner"},
		{"\x00\x01\xff", ServiceUnknown, "unrecognised binary banner"},
	}
	for _, tt := range tests {
		svc, ident := classifyBanner([]byte(tt.banner))
		if svc != tt.service || !strings.HasPrefix(ident, tt.ident) {
			t.Errorf("classifyBanner(%q) = %s, %q; want %s, %q…", tt.banner, svc, ident, tt.service, tt.ident)
		}
	}
}

func TestActiveBlocked(t *testing.T) {
	p := &prober{o: (&ProbeOptions{PrintPorts: []int{1}}).withDefaults()}
	p.printOnce.Do(func() {}) // no host: pretend the print-port check found nothing
	ctx := context.Background()
	for _, port := range []int{9100, 9107, 515, 631, 35, 92, 170} {
		if why := p.activeBlocked(ctx, port, ""); !strings.Contains(why, "print port") {
			t.Errorf("port %d: %q, want blocked as a print port", port, why)
		}
	}
	if why := p.activeBlocked(ctx, 641, ServicePrinter); !strings.Contains(why, "banner") {
		t.Errorf("printer banner: %q", why)
	}
	if why := p.activeBlocked(ctx, 641, ""); why != "" {
		t.Errorf("641 with no printer around: %q", why)
	}
	p.printSeen = []int{9100}
	if why := p.activeBlocked(ctx, 641, ""); !strings.Contains(why, "[9100]") {
		t.Errorf("641 on a host with a printer: %q", why)
	}
}
