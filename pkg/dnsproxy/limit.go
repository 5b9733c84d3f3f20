package dnsproxy

import (
	"net"
	"net/netip"
	"sync/atomic"

	"golang.org/x/net/dns/dnsmessage"
)

// limit counts what is in flight against a cap; max <= 0 is no cap.
type limit struct {
	max  int64
	held atomic.Int64
}

func (l *limit) take() bool {
	if l.held.Add(1) > l.max && l.max > 0 {
		l.held.Add(-1)
		return false
	}
	return true
}

func (l *limit) put() { l.held.Add(-1) }

func (s *Server) refused(network string) {
	if s.cfg.OnRefuse != nil {
		s.cfg.OnRefuse(network)
	}
}

// refuseUDP answers a query over the cap with REFUSED from the reading
// goroutine: no upstream is asked, nothing waits.
func (s *Server) refuseUDP(c *net.UDPConn, query []byte, from netip.AddrPort) {
	s.refused("udp")
	if resp := refusal(query); resp != nil {
		c.WriteToUDPAddrPort(resp, from)
	}
}

// refusal is the REFUSED answer to query; nil when query is not one.
func refusal(query []byte) []byte {
	var msg dnsmessage.Message
	if err := msg.Unpack(query); err != nil || msg.Response || len(msg.Questions) != 1 {
		return nil
	}
	return reply(&msg, dnsmessage.RCodeRefused, nil)
}

// resetClose closes a TCP connection with a reset, so that a refused
// client learns at once and no TIME_WAIT is left.
func resetClose(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}
