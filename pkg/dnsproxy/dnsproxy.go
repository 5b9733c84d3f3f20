// Package dnsproxy is the in-pod DNS resolver of the mesh proxy, the
// counterpart of ztunnel's DNS proxy: the datapath sends a pod's DNS
// (UDP and TCP port 53) to it on 127.0.0.1:15053 and [::1]:15053.
//
// It answers A and AAAA questions for names the mesh knows itself
// (Config.Names: service names the way ztunnel answers them, see Names;
// or Config.Lookup), and forwards every other query unchanged to an
// upstream resolver over the same transport the client used, caching the
// answers for their TTL (see cache). A name found after stripping one of
// the pod's search domains is answered with a CNAME to the stripped name,
// as ztunnel does, so that the client's resolver takes the first search
// expansion it tries instead of walking the list to the upstream.
//
// Config.Metrics counts the queries with ztunnel's istio_dns_* metrics.
package dnsproxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/ambpf/ambpf/pkg/closers"
	"github.com/ambpf/ambpf/pkg/metrics"
)

// TTL is the time to live of the answers the proxy makes itself, in
// seconds; short, because service VIPs change with configuration.
const TTL = 30

// maxUDP is the largest datagram read or forwarded. EDNS0 allows large
// answers over UDP; 64 KiB covers any.
const maxUDP = 64 << 10

// Config configures a Server.
type Config struct {
	// Lookup returns the addresses of a mesh name (lower case, without
	// the trailing dot), and false when the mesh does not know it. It is
	// called for every A/AAAA question and must be safe for concurrent
	// use. nil means every query is forwarded.
	Lookup func(name string) ([]netip.Addr, bool)
	// Names, when set, resolves mesh names instead of Lookup: service
	// names in every form ztunnel answers, headless services with their
	// endpoints, search-domain expansions with a CNAME.
	Names *Names
	// CacheSize bounds the upstream answers kept (0: DefaultCacheSize;
	// negative: no cache).
	CacheSize int
	// Metrics, when set, counts queries (istio_dns_*); Client fills the
	// source labels, or ClientFunc, called per query, when set (the
	// client's labels may change while it runs).
	Metrics    *metrics.DNS
	Client     metrics.DNSQuery
	ClientFunc func() metrics.DNSQuery
	// Upstreams are the resolvers other queries go to, tried in order.
	// Without one, such queries are answered SERVFAIL.
	Upstreams []netip.AddrPort
	// Dial connects to an upstream ("udp" or "tcp"); the proxy's dialer
	// creates the socket in the pod with the proxy mark so that the query
	// is not captured again. A plain net.Dialer when nil.
	Dial func(ctx context.Context, network string, addr netip.AddrPort) (net.Conn, error)
	// Timeout bounds one upstream exchange (default 5 s), and how long
	// a TCP client may stay idle between queries.
	Timeout time.Duration
	// MaxInFlight, when positive, caps the queries being answered at
	// once (UDP and TCP together) and, separately, the open TCP
	// connections. A query over the cap is answered REFUSED at once and
	// a connection over it is reset; OnRefuse, when set, is called for
	// each ("udp" or "tcp").
	MaxInFlight int
	OnRefuse    func(network string)
	Logger      *slog.Logger
}

// Server answers DNS on the listeners given to ServeUDP and ServeTCP.
// Close stops all of them.
type Server struct {
	cfg Config
	log *slog.Logger

	open closers.Set
	wg   sync.WaitGroup

	queries, tcpConns limit
	cache             *cache
}

// New returns a Server; it serves nothing until ServeUDP or ServeTCP.
func New(cfg Config) *Server {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = func(ctx context.Context, network string, addr netip.AddrPort) (net.Conn, error) {
			return d.DialContext(ctx, network, addr.String())
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Server{cfg: cfg, log: cfg.Logger.With("component", "dns-proxy"),
		queries: limit{max: int64(cfg.MaxInFlight)}, tcpConns: limit{max: int64(cfg.MaxInFlight)},
		cache: newCache(cfg.CacheSize)}
}

// ServeUDP answers datagrams on c until Close. Each query is handled on
// its own goroutine, so a slow upstream does not hold the others.
func (s *Server) ServeUDP(c *net.UDPConn) error {
	if !s.open.Add(c) {
		return net.ErrClosed
	}
	defer s.open.Remove(c)
	for {
		buf := make([]byte, maxUDP)
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("dns read on %s: %w", c.LocalAddr(), err)
		}
		if !s.queries.take() {
			s.refuseUDP(c, buf[:n], from)
			continue
		}
		s.wg.Go(func() {
			defer s.queries.put()
			resp := s.answer(context.Background(), buf[:n], "udp")
			if resp == nil {
				return
			}
			if _, err := c.WriteToUDPAddrPort(resp, from); err != nil {
				s.log.Debug("dns reply", "to", from, "err", err)
			}
		})
	}
}

// ServeTCP answers length-prefixed queries on connections accepted from
// ln until Close.
func (s *Server) ServeTCP(ln net.Listener) error {
	if !s.open.Add(ln) {
		return net.ErrClosed
	}
	defer s.open.Remove(ln)
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("dns accept on %s: %w", ln.Addr(), err)
		}
		if !s.tcpConns.take() {
			s.refused("tcp")
			resetClose(c)
			continue
		}
		if !s.open.Add(c) {
			s.tcpConns.put()
			return nil
		}
		s.wg.Go(func() {
			defer s.tcpConns.put()
			defer s.open.Remove(c)
			s.serveTCPConn(c)
		})
	}
}

// serveTCPConn answers queries one after the other until the client
// closes or stays idle for the timeout.
func (s *Server) serveTCPConn(c net.Conn) {
	for {
		c.SetReadDeadline(time.Now().Add(s.cfg.Timeout))
		q, err := readTCPMessage(c)
		if err != nil {
			return
		}
		var resp []byte
		if s.queries.take() {
			resp = s.answer(context.Background(), q, "tcp")
			s.queries.put()
		} else {
			s.refused("tcp")
			resp = refusal(q)
		}
		if resp == nil {
			return
		}
		if err := writeTCPMessage(c, resp); err != nil {
			return
		}
	}
}

// Close stops every listener and connection and waits for the handlers.
func (s *Server) Close() error {
	s.open.Close()
	s.wg.Wait()
	return nil
}

// answer returns the response to query, or nil when there is nothing to
// send (an unparsable message).
func (s *Server) answer(ctx context.Context, query []byte, network string) []byte {
	var msg dnsmessage.Message
	if err := msg.Unpack(query); err != nil || msg.Response || len(msg.Questions) != 1 {
		return nil
	}
	labels := s.cfg.Client
	if s.cfg.ClientFunc != nil {
		labels = s.cfg.ClientFunc()
	}
	labels.Type, labels.Protocol = strings.ToLower(strings.TrimPrefix(msg.Questions[0].Type.String(), "Type")), network
	s.cfg.Metrics.Request(labels)
	if resp, ok := s.local(&msg); ok {
		return resp
	}
	if resp := s.cache.get(&msg, network); resp != nil {
		return resp
	}
	start := time.Now()
	resp, err := s.forward(ctx, query, network)
	s.cfg.Metrics.Upstream(labels, time.Since(start), err != nil)
	if err != nil {
		s.log.Debug("dns forward", "name", msg.Questions[0].Name.String(), "err", err)
		return reply(&msg, dnsmessage.RCodeServerFailure, nil)
	}
	s.cache.put(&msg, network, resp)
	return resp
}

// local answers an A/AAAA question for a mesh name.
func (s *Server) local(msg *dnsmessage.Message) ([]byte, bool) {
	q := msg.Questions[0]
	if (s.cfg.Lookup == nil && s.cfg.Names == nil) || q.Class != dnsmessage.ClassINET || (q.Type != dnsmessage.TypeA && q.Type != dnsmessage.TypeAAAA) {
		return nil, false
	}
	name := strings.ToLower(strings.TrimSuffix(q.Name.String(), "."))
	owner := q.Name
	var answers []dnsmessage.Resource
	var addrs []netip.Addr
	if s.cfg.Names != nil {
		m, ok := s.cfg.Names.Resolve(name)
		if !ok {
			return nil, false
		}
		addrs = Addresses(m.Service)
		if m.Canonical != "" {
			target, err := dnsmessage.NewName(m.Canonical + ".")
			if err != nil {
				return nil, false
			}
			answers = append(answers, dnsmessage.Resource{
				Header: dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: TTL},
				Body:   &dnsmessage.CNAMEResource{CNAME: target}})
			owner = target
		}
	} else {
		var ok bool
		if addrs, ok = s.cfg.Lookup(name); !ok {
			return nil, false
		}
	}
	found := false
	for _, a := range addrs {
		a = a.Unmap()
		h := dnsmessage.ResourceHeader{Name: owner, Class: dnsmessage.ClassINET, TTL: TTL}
		switch {
		case q.Type == dnsmessage.TypeA && a.Is4():
			answers = append(answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AResource{A: a.As4()}})
			found = true
		case q.Type == dnsmessage.TypeAAAA && a.Is6():
			answers = append(answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AAAAResource{AAAA: a.As16()}})
			found = true
		}
	}
	if !found {
		// A known name without an address of the asked family is NOERROR
		// with no answer (NODATA), not NXDOMAIN: the name exists. ztunnel
		// sends no CNAME then either.
		answers = nil
	}
	return reply(msg, dnsmessage.RCodeSuccess, answers), true
}

// reply builds a response to msg; nil if it cannot be packed.
func reply(msg *dnsmessage.Message, rcode dnsmessage.RCode, answers []dnsmessage.Resource) []byte {
	resp := dnsmessage.Message{
		Header: dnsmessage.Header{
			ID: msg.ID, Response: true, Authoritative: rcode == dnsmessage.RCodeSuccess,
			RecursionDesired: msg.RecursionDesired, RecursionAvailable: true, RCode: rcode,
		},
		Questions: msg.Questions,
		Answers:   answers,
	}
	b, err := resp.Pack()
	if err != nil {
		return nil
	}
	return b
}

// forward sends query to the upstreams in order and returns the first
// answer.
func (s *Server) forward(ctx context.Context, query []byte, network string) ([]byte, error) {
	if len(s.cfg.Upstreams) == 0 {
		return nil, errors.New("no upstream resolver")
	}
	var errs []error
	for _, up := range s.cfg.Upstreams {
		resp, err := s.exchange(ctx, query, network, up)
		if err == nil {
			return resp, nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

func (s *Server) exchange(ctx context.Context, query []byte, network string, up netip.AddrPort) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	c, err := s.cfg.Dial(ctx, network, up)
	if err != nil {
		return nil, fmt.Errorf("dial %s %s: %w", network, up, err)
	}
	if !s.open.Add(c) {
		return nil, net.ErrClosed
	}
	defer s.open.Remove(c)
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline)
	if network == "tcp" {
		if err := writeTCPMessage(c, query); err != nil {
			return nil, fmt.Errorf("send to %s: %w", up, err)
		}
		resp, err := readTCPMessage(c)
		if err != nil {
			return nil, fmt.Errorf("read from %s: %w", up, err)
		}
		return resp, nil
	}
	if _, err := c.Write(query); err != nil {
		return nil, fmt.Errorf("send to %s: %w", up, err)
	}
	buf := make([]byte, maxUDP)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return nil, fmt.Errorf("read from %s: %w", up, err)
		}
		// A stray datagram with another ID is not our answer.
		if n >= 2 && binary.BigEndian.Uint16(buf) == binary.BigEndian.Uint16(query) {
			return buf[:n], nil
		}
	}
}

// readTCPMessage reads one DNS message with its two-byte length prefix
// (RFC 1035 4.2.2).
func readTCPMessage(r io.Reader) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, err
	}
	b := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	return b, nil
}

func writeTCPMessage(w io.Writer, msg []byte) error {
	if len(msg) > 0xffff {
		return fmt.Errorf("dns message of %d bytes is too long for TCP", len(msg))
	}
	b := make([]byte, 2+len(msg))
	binary.BigEndian.PutUint16(b, uint16(len(msg)))
	copy(b[2:], msg)
	_, err := w.Write(b)
	return err
}
