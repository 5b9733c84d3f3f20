package writebatch

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"testing"

	"github.com/ambpf/ambpf/pkg/identity"
)

// countingConn counts the writes that reach it and keeps what they wrote,
// passing them on to Conn if set.
type countingConn struct {
	net.Conn
	writes int
	got    bytes.Buffer
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes++
	if c.Conn != nil {
		return c.Conn.Write(p)
	}
	return c.got.Write(p)
}

func TestHoldGathersWrites(t *testing.T) {
	cc := &countingConn{}
	b := &Conn{Conn: cc}
	b.Write([]byte("a"))
	if cc.writes != 1 {
		t.Fatalf("a write outside Hold: %d writes below, want 1", cc.writes)
	}
	b.Hold()
	for _, s := range []string{"b", "c", "d"} {
		b.Write([]byte(s))
	}
	if cc.writes != 1 {
		t.Fatalf("writes while holding reached the connection: %d writes", cc.writes)
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	if cc.writes != 2 || cc.got.String() != "abcd" {
		t.Fatalf("after Flush: %d writes of %q, want 2 of \"abcd\"", cc.writes, cc.got.String())
	}
	if err := b.Flush(); err != nil || cc.writes != 2 {
		t.Fatalf("an empty Flush wrote: %d writes, err %v", cc.writes, err)
	}
}

// TestTLSRecordsInOneWrite is what the package is for: after a real TLS
// 1.3 handshake, a 256 KiB write (16 records) reaches the socket as one
// write, and the peer reads all of it.
func TestTLSRecordsInOneWrite(t *testing.T) {
	ca, err := identity.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.IssueTLS(identity.MustParse("spiffe://cluster.local/ns/a/sa/b"), 0)
	if err != nil {
		t.Fatal(err)
	}
	a, z := net.Pipe()
	defer a.Close()
	defer z.Close()
	cc := &countingConn{Conn: a}
	b := &Conn{Conn: cc}
	srv := tls.Server(b, &tls.Config{Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS13})
	cli := tls.Client(z, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
	const size = 256 << 10
	got := make(chan []byte, 1)
	go func() {
		buf := make([]byte, size)
		n, err := io.ReadFull(cli, buf)
		if err != nil {
			t.Errorf("client read: %v", err)
		}
		got <- buf[:n]
	}()
	if err := srv.Handshake(); err != nil {
		t.Fatal(err)
	}
	before := cc.writes
	msg := bytes.Repeat([]byte("x"), size)
	b.Hold()
	if _, err := srv.Write(msg); err != nil {
		t.Fatal(err)
	}
	if cc.writes != before {
		t.Fatalf("records reached the connection while holding: %d writes", cc.writes-before)
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	if cc.writes != before+1 {
		t.Fatalf("%d writes for 256 KiB, want 1", cc.writes-before)
	}
	if r := <-got; !bytes.Equal(r, msg) {
		t.Fatalf("peer read %d bytes, not what was written", len(r))
	}
}
