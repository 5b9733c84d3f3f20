//go:build linux

package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestHalfCloseBinary: through the installed proxy binary, a server app
// that writes its answer, sends FIN and keeps reading still gets all the
// data the client sends after that FIN, then the client's own FIN: each
// direction of a connection ends on its own. Over passthrough (the
// destination is outside the mesh), HBONE over HTTP/2 and HBONE over
// HTTP/3.
func TestHalfCloseBinary(t *testing.T) {
	e := newBinEnv(t, 4, "--hbone-h3-serve", "--hbone-h3-namespaces", "ns-h3")
	e.enroll(0, "ns-a", "sa-a")
	e.enroll(1, "ns-b", "sa-b")
	e.enroll(2, "ns-h3", "sa-c")
	// pod3 stays outside the mesh.
	for _, tc := range []struct {
		name      string
		pod       int
		transport string // the inbound log's hbone.transport; "" for passthrough
	}{
		{"pass", 3, ""},
		{"mesh-h2", 1, "h2"},
		{"mesh-h3", 2, "h3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := halfCloseApp(t, e, tc.pod)
			addr := net.JoinHostPort(e.lab.Pod(tc.pod).IPv4.String(), strconv.Itoa(halfClosePort))
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := e.lab.Pod(0).Dial(ctx, "tcp", addr)
			if err != nil {
				t.Fatalf("dial %s: %v", addr, err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			answer, err := io.ReadAll(c)
			if err != nil || string(answer) != "answer\n" {
				t.Fatalf("read %q, %v; want the answer, then EOF", answer, err)
			}
			// More than a stream window, after the server's FIN.
			rest := make([]byte, 6<<20)
			rand.Read(rest)
			if _, err := c.Write(rest); err != nil {
				t.Fatalf("write after the server's FIN: %v", err)
			}
			if err := c.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			select {
			case b := <-got:
				if !bytes.Equal(b, rest) {
					t.Fatalf("app read %d bytes after its FIN, want the %d the client sent", len(b), len(rest))
				}
			case <-ctx.Done():
				t.Fatal("the app never got the client's data and FIN")
			}
			if tc.transport != "" {
				waitFor(t, "inbound connection over "+tc.transport+" logged", func() bool {
					return e.logHas(`"connection complete"`, `"direction":"inbound"`, `"outcome":"success"`,
						`"hbone.transport":"`+tc.transport+`"`, `"dst.hbone_addr":"`+addr+`"`)
				})
			}
		})
	}
}

const halfClosePort = 9090

// halfCloseApp listens on pod i, port 9090: for one connection it writes
// "answer\n", half-closes, reads until the client's FIN and sends what it
// read on the returned channel.
func halfCloseApp(t *testing.T, e *binEnv, i int) <-chan []byte {
	t.Helper()
	ln, err := e.lab.Pod(i).Listen("tcp", ":"+strconv.Itoa(halfClosePort))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		c.Write([]byte("answer\n"))
		c.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(c)
		got <- b
	}()
	return got
}

// logHas reports whether one line of the proxy's log contains every part.
func (e *binEnv) logHas(parts ...string) bool {
	b, err := os.ReadFile(e.proc.LogPath())
	if err != nil {
		e.t.Fatalf("proxy log: %v", err)
	}
lines:
	for line := range strings.SplitSeq(string(b), "\n") {
		for _, p := range parts {
			if !strings.Contains(line, p) {
				continue lines
			}
		}
		return true
	}
	return false
}
