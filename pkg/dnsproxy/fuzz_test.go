package dnsproxy

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// fuzzMesh is the mesh the fuzzed resolver knows: one name with both
// families, one with IPv4 only.
var fuzzMesh = map[string][]netip.Addr{
	"web.shop.svc.cluster.local": {netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd96::10")},
	"db.shop.svc.cluster.local":  {netip.MustParseAddr("::ffff:10.96.0.11")},
}

func fuzzQuery(id uint16, name string, typ dnsmessage.Type, rd bool) []byte {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: rd})
	b.StartQuestions()
	b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET})
	out, _ := b.Finish()
	return out
}

// FuzzAnswer feeds arbitrary datagrams to the resolver the proxy runs for
// captured DNS. Upstreams are unreachable, so every query the mesh does
// not answer must come back SERVFAIL. Properties: what does not parse as
// one question is dropped (no answer); everything else gets exactly one
// response with the query's ID and question, RD copied, no more than
// 64 KiB; a mesh name's A/AAAA answer lists exactly the mesh's addresses
// of that family, with the TTL; and the TCP framing carries it intact.
func FuzzAnswer(f *testing.F) {
	f.Add(fuzzQuery(1, "web.shop.svc.cluster.local.", dnsmessage.TypeA, true))
	f.Add(fuzzQuery(2, "WEB.shop.svc.cluster.local.", dnsmessage.TypeAAAA, false))
	f.Add(fuzzQuery(3, "db.shop.svc.cluster.local.", dnsmessage.TypeAAAA, true))
	f.Add(fuzzQuery(4, "example.com.", dnsmessage.TypeA, true))
	f.Add(fuzzQuery(5, "web.shop.svc.cluster.local.", dnsmessage.TypeMX, true))
	f.Add([]byte{0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1})
	f.Add([]byte{})
	s := New(Config{
		Lookup: func(name string) ([]netip.Addr, bool) {
			a, ok := fuzzMesh[name]
			return a, ok
		},
		Upstreams: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.53:53")},
		Dial: func(context.Context, string, netip.AddrPort) (net.Conn, error) {
			return nil, errors.New("no upstream in this test")
		},
		Logger: slog.New(slog.DiscardHandler),
	})
	f.Fuzz(func(t *testing.T, query []byte) {
		var q dnsmessage.Message
		parseErr := q.Unpack(query)
		resp := s.answer(context.Background(), query, "udp")
		if parseErr != nil || q.Response || len(q.Questions) != 1 {
			if resp != nil {
				t.Fatalf("% x: answered a message that is not one question", query)
			}
			return
		}
		if resp == nil {
			// Only a question that cannot be packed again goes unanswered.
			if _, err := (&dnsmessage.Message{Questions: q.Questions}).Pack(); err == nil {
				t.Fatalf("% x: no answer to a valid question %v", query, q.Questions[0])
			}
			return
		}
		if len(resp) > maxUDP {
			t.Fatalf("answer of %d bytes", len(resp))
		}
		var r dnsmessage.Message
		if err := r.Unpack(resp); err != nil {
			t.Fatalf("answer does not parse: %v", err)
		}
		if !r.Response || r.ID != q.ID || r.RecursionDesired != q.RecursionDesired || len(r.Questions) != 1 || r.Questions[0] != q.Questions[0] {
			t.Fatalf("answer header %+v / questions %v for query %+v / %v", r.Header, r.Questions, q.Header, q.Questions)
		}
		qq := q.Questions[0]
		addrs, known := fuzzMesh[strings.ToLower(strings.TrimSuffix(qq.Name.String(), "."))]
		local := known && qq.Class == dnsmessage.ClassINET && (qq.Type == dnsmessage.TypeA || qq.Type == dnsmessage.TypeAAAA)
		if !local {
			if r.RCode != dnsmessage.RCodeServerFailure || len(r.Answers) != 0 {
				t.Fatalf("%v with no upstream: rcode %v, %d answers", qq, r.RCode, len(r.Answers))
			}
			return
		}
		var want, got []netip.Addr
		for _, a := range addrs {
			if a = a.Unmap(); a.Is4() == (qq.Type == dnsmessage.TypeA) {
				want = append(want, a)
			}
		}
		for _, a := range r.Answers {
			if a.Header.TTL != TTL || a.Header.Name != qq.Name {
				t.Fatalf("answer header %+v", a.Header)
			}
			switch b := a.Body.(type) {
			case *dnsmessage.AResource:
				got = append(got, netip.AddrFrom4(b.A))
			case *dnsmessage.AAAAResource:
				got = append(got, netip.AddrFrom16(b.AAAA))
			}
		}
		if r.RCode != dnsmessage.RCodeSuccess || len(got) != len(want) || (len(want) > 0 && got[0] != want[0]) {
			t.Fatalf("%v: rcode %v answers %v, want %v", qq, r.RCode, got, want)
		}
		var framed bytes.Buffer
		if err := writeTCPMessage(&framed, resp); err != nil {
			t.Fatal(err)
		}
		back, err := readTCPMessage(&framed)
		if err != nil || !bytes.Equal(back, resp) || framed.Len() != 0 {
			t.Fatalf("TCP framing: %v, equal=%v, %d bytes left", err, bytes.Equal(back, resp), framed.Len())
		}
	})
}
