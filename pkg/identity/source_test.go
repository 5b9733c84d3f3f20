package identity

import (
	"bufio"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"math/big"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// echoTLS serves a line echo over TLS with the source's certificate.
func echoTLS(t *testing.T, src *Source) net.Listener {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: src.GetCertificate, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if _, err := c.Write([]byte(line)); err != nil {
						return
					}
				}
			})
		}
	})
	return ln
}

// dialSerial connects, verifies the chain against ca and returns the
// connection and the serial of the certificate the server presented.
func dialSerial(t *testing.T, addr string, ca *CA) (*tls.Conn, *big.Int) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{
		InsecureSkipVerify: true, // no DNS SAN: the chain is verified below
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: ca.Roots()})
			return err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, c.ConnectionState().PeerCertificates[0].SerialNumber
}

func echoOnce(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg + "\n")); err != nil {
		t.Fatalf("write: %v", err)
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || got != msg+"\n" {
		t.Fatalf("echo = %q, %v", got, err)
	}
}

func TestSourceRotation(t *testing.T) {
	ca, err := LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var rotations atomic.Int32
	src, err := NewSource(SourceConfig{
		Identity: testID, Issuer: ca, Lifetime: 2 * time.Second,
		RenewMin: 0.4, RenewMax: 0.6,
		OnRotate: func(*tls.Certificate) { rotations.Add(1) },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	if id, err := FromCertificate(src.Certificate().Leaf); err != nil || id != testID {
		t.Fatalf("source certificate identity = %v, %v", id, err)
	}
	ln := echoTLS(t, src)

	old, first := dialSerial(t, ln.Addr().String(), ca)
	echoOnce(t, old, "before")
	if src.Certificate().Leaf.SerialNumber.Cmp(first) != 0 {
		t.Fatal("server presented a certificate that is not the source's current one")
	}

	deadline := time.Now().Add(10 * time.Second)
	for src.Certificate().Leaf.SerialNumber.Cmp(first) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("certificate was not renewed within 10s of a 2s lifetime")
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, second := dialSerial(t, ln.Addr().String(), ca)
	if second.Cmp(first) == 0 {
		t.Fatal("new handshake still got the old certificate")
	}
	// The connection made before the rotation is untouched.
	echoOnce(t, old, "after")
	if rotations.Load() == 0 {
		t.Fatal("OnRotate was not called")
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	if err := src.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
}

type flakyIssuer struct {
	ca    *CA
	fail  atomic.Int32 // fail this many more calls
	calls atomic.Int32
	id    *Identity // when set, issue for this identity instead
}

func (f *flakyIssuer) IssueKey(id Identity, key crypto.Signer, life time.Duration) ([]*x509.Certificate, error) {
	f.calls.Add(1)
	if f.fail.Add(-1) >= 0 {
		return nil, errors.New("issuer unavailable")
	}
	if f.id != nil {
		id = *f.id
	}
	return f.ca.IssueKey(id, key, life)
}

func TestSourceErrorsAndRetry(t *testing.T) {
	ca, err := LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	down := &flakyIssuer{ca: ca}
	down.fail.Store(1)
	if _, err := NewSource(SourceConfig{Identity: testID, Issuer: down}); err == nil || !strings.Contains(err.Error(), "issuer unavailable") {
		t.Fatalf("NewSource with failing issuer: %v", err)
	}
	other := MustParse("spiffe://cluster.local/ns/other/sa/x")
	liar := &flakyIssuer{ca: ca, id: &other}
	if _, err := NewSource(SourceConfig{Identity: testID, Issuer: liar}); err == nil || !strings.Contains(err.Error(), "want "+testID.String()) {
		t.Fatalf("NewSource with wrong-identity issuer: %v", err)
	}
	if _, err := NewSource(SourceConfig{Identity: testID, Issuer: ca, RenewMin: 0.9, RenewMax: 0.5}); err == nil {
		t.Fatal("NewSource accepted min > max")
	}
	if _, err := NewSource(SourceConfig{Identity: testID}); err == nil {
		t.Fatal("NewSource accepted a nil issuer")
	}

	// A renewal failure is retried and the source recovers.
	flaky := &flakyIssuer{ca: ca}
	src, err := NewSource(SourceConfig{Identity: testID, Issuer: flaky, Lifetime: 2 * time.Second, RetryInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	first := src.Certificate().Leaf.SerialNumber
	flaky.fail.Store(2)
	deadline := time.Now().Add(10 * time.Second)
	for src.Certificate().Leaf.SerialNumber.Cmp(first) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("source did not recover from failed renewals")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n := flaky.calls.Load(); n < 4 {
		t.Fatalf("issuer called %d times, want initial + 2 failures + success", n)
	}
}

// TestBackoff: the retry wait doubles from the base, stops at the limit,
// and its jitter only shortens it, by at most 20%.
func TestBackoff(t *testing.T) {
	base, limit := 100*time.Millisecond, time.Second
	for n, want := range []time.Duration{100, 200, 400, 800, 1000, 1000} {
		want *= time.Millisecond
		for range 50 {
			if got := backoff(base, limit, n); got > want || got < want*8/10 {
				t.Fatalf("backoff after %d failures = %s, want in [%s, %s]", n, got, want*8/10, want)
			}
		}
	}
}
