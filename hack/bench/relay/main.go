//go:build linux

// Command relay is the mesh benchmark's reference proxy: the least a
// user-space proxy between two apps must do, and nothing else. It gives
// hack/bench/mesh its relay-tcp and relay-tls rows, which put a number on
// what the machine charges for the proxy's legs themselves, so that
// ambpf-proxy's pass and mesh rows can be read against that floor rather
// than only against no proxy at all.
//
//	relay -tcp LISTEN=TO ...      accept, dial TO, copy both ways (io.Copy:
//	                              splice between the two sockets, as
//	                              ambpf-proxy's passthrough)
//	relay -tls LISTEN=MID=TO ...  accept plaintext on LISTEN, carry it over
//	                              TLS 1.3 to MID (served by this process),
//	                              and from there in plaintext to TO: the
//	                              three sockets' legs and the one seal and
//	                              one open per byte of a mesh connection
//	                              through one node proxy, without HTTP/2,
//	                              identities, policy or capture
//
// TLS records are gathered into one write per read from the app, as
// ambpf-proxy does, so the relay is not slower than the proxy by more
// system calls. It runs until it gets SIGTERM or SIGINT.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/writebatch"
)

// bufSize is what one read from the app may take: large enough that
// TLS's 16 KiB records, gathered, go out in few writes.
const bufSize = 256 << 10

type specs []string

func (s *specs) String() string     { return strings.Join(*s, " ") }
func (s *specs) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	var tcp, tlsSpecs specs
	flag.Var(&tcp, "tcp", "LISTEN=TO: a TCP relay (repeatable)")
	flag.Var(&tlsSpecs, "tls", "LISTEN=MID=TO: plaintext in, TLS to MID, plaintext to TO (repeatable)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, tcp, tlsSpecs); err != nil {
		log.Error("relay", "err", err)
		os.Exit(1)
	}
}

// run relays as the specs say until ctx ends.
func run(ctx context.Context, tcp, tlsSpecs specs) error {
	if len(tcp)+len(tlsSpecs) == 0 {
		return errors.New("nothing to relay: give -tcp or -tls")
	}
	srvConf, cliConf, err := tlsConfigs()
	if err != nil {
		return err
	}
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	listen := func(addr string, serve func(net.Conn)) error {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		lns = append(lns, ln)
		go accept(ln, serve)
		return nil
	}
	for _, s := range tcp {
		from, to, ok := strings.Cut(s, "=")
		if !ok {
			return fmt.Errorf("-tcp %q: want LISTEN=TO", s)
		}
		if err := listen(from, func(c net.Conn) { relay(c, to, nil) }); err != nil {
			return fmt.Errorf("-tcp %q: %w", s, err)
		}
	}
	for _, s := range tlsSpecs {
		f := strings.Split(s, "=")
		if len(f) != 3 {
			return fmt.Errorf("-tls %q: want LISTEN=MID=TO", s)
		}
		from, mid, to := f[0], f[1], f[2]
		if err := listen(from, func(c net.Conn) { relay(c, mid, cliConf) }); err != nil {
			return fmt.Errorf("-tls %q: %w", s, err)
		}
		if err := listen(mid, func(c net.Conn) {
			bc := &writebatch.Conn{Conn: c}
			relay(tls.Server(bc, srvConf), to, nil)
		}); err != nil {
			return fmt.Errorf("-tls %q: %w", s, err)
		}
	}
	<-ctx.Done()
	return nil
}

func accept(ln net.Listener, serve func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go serve(c)
	}
}

// relay dials to (over TLS if conf is set) and copies both ways until
// both directions ended, passing each direction's end on as a half-close.
func relay(in net.Conn, to string, conf *tls.Config) {
	defer in.Close()
	raw, err := net.DialTimeout("tcp", to, 5*time.Second)
	if err != nil {
		return
	}
	var out net.Conn = raw
	if conf != nil {
		out = tls.Client(&writebatch.Conn{Conn: raw}, conf)
	}
	defer out.Close()
	// Handshake before copying: a handshake inside a held batch would
	// wait for an answer to messages not yet sent.
	for _, c := range []net.Conn{in, out} {
		if tc, ok := c.(*tls.Conn); ok {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			err := tc.HandshakeContext(ctx)
			cancel()
			if err != nil {
				return
			}
		}
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); pipe(out, in) }()
	go func() { defer wg.Done(); pipe(in, out) }()
	wg.Wait()
}

// pipe copies src to dst, then half-closes dst. Between two TCP sockets
// io.Copy splices; into TLS, each read from src is sealed into records
// gathered by dst's writebatch.Conn and written at once.
func pipe(dst, src net.Conn) {
	defer closeWrite(dst)
	tc, isTLS := dst.(*tls.Conn)
	if !isTLS {
		if _, ok := src.(*tls.Conn); !ok {
			io.Copy(dst, src)
			return
		}
	}
	buf := make([]byte, bufSize)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if isTLS {
				bc := tc.NetConn().(*writebatch.Conn)
				bc.Hold()
				_, werr := dst.Write(buf[:n])
				if ferr := bc.Flush(); werr == nil {
					werr = ferr
				}
				err = errors.Join(err, werr)
			} else if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// tlsConfigs returns a server configuration with a workload certificate
// from a throw-away CA (ECDSA P-256, as the proxy's) and a client
// configuration that accepts it unverified: the relay measures the data
// path, and a handshake happens once per connection.
func tlsConfigs() (server, client *tls.Config, err error) {
	dir, err := os.MkdirTemp("", "relay-ca-")
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(dir)
	ca, err := identity.LoadOrCreate(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("CA: %w", err)
	}
	cert, err := ca.IssueTLS(identity.MustParse("spiffe://cluster.local/ns/relay/sa/relay"), 0)
	if err != nil {
		return nil, nil, fmt.Errorf("certificate: %w", err)
	}
	server = &tls.Config{Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS13}
	client = &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
	return server, client, nil
}
