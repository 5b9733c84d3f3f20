//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"testing"
	"time"
)

// freeAddr is a loopback address with a port nothing listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestRelaysCarryBothWaysAndHalfClose: through each relay kind, 4 MiB
// reach the server intact, the server's answer comes back after the
// client half-closed, and the client sees the server's end.
func TestRelaysCarryBothWaysAndHalfClose(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// The server reads to EOF, then answers with what it read.
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(c)
				c.Write(b)
			}()
		}
	}()
	server := ln.Addr().String()
	tcpIn, tlsIn, tlsMid := freeAddr(t), freeAddr(t), freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, specs{tcpIn + "=" + server}, specs{tlsIn + "=" + tlsMid + "=" + server})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	}()
	data := make([]byte, 4<<20)
	rand.Read(data)
	for name, addr := range map[string]string{"tcp": tcpIn, "tls": tlsIn} {
		var c net.Conn
		for end := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if c, err = net.Dial("tcp", addr); err == nil || time.Now().After(end) {
				break
			}
		}
		if err != nil {
			t.Fatalf("%s: dial: %v", name, err)
		}
		c.SetDeadline(time.Now().Add(20 * time.Second))
		go func() {
			c.Write(data)
			c.(*net.TCPConn).CloseWrite()
		}()
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%s: read back %d bytes (err %v), want the %d sent", name, len(got), err, len(data))
		}
	}
}

func TestBadSpecs(t *testing.T) {
	for _, c := range []struct{ tcp, tls specs }{
		{},
		{tcp: specs{"127.0.0.1:1"}},
		{tls: specs{"127.0.0.1:1=127.0.0.1:2"}},
	} {
		if err := run(context.Background(), c.tcp, c.tls); err == nil {
			t.Errorf("run(%v, %v) = nil, want an error", c.tcp, c.tls)
		}
	}
}
