//go:build linux

package demo

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nodelab"
)

// conversation is the packets of one client -> server:port pair.
type conversation struct {
	client, server netip.Addr
	port           uint16
	packets, bytes int
}

// servicePorts are the server ports the summary groups by.
var servicePorts = map[uint16]bool{appPort: true, meshconst.InboundHBONEPort: true}

// tcpdumpLine matches `tcpdump -r -nn -q -t` output: "... IP a.b.c.d.port > e.f.g.h.port: tcp N".
var tcpdumpLine = regexp.MustCompile(`IP6? (\S+)\.(\d+) > (\S+)\.(\d+): tcp (\d+)`)

// onLink marks a conversation seen on node 1's inter-node link (the
// others are on its bridge ports).
const onLink = " [inter-node link]"

// showWire stops the capture and shows, per connection, who talked to
// whom on which port (on node 1's bridge ports and on the inter-node
// link), and whether the apps' answers are readable on the wire: the mesh
// -> mesh answers must not be (they travelled in TLS, on one node and
// between nodes), the passthrough one must be (plain TCP, as without a
// mesh).
func (d *demo) showWire(ctx context.Context) error {
	w := d.wire
	out, err := w.Read(ctx, "-q", "-t")
	if err != nil {
		return err
	}
	convs := map[string]*conversation{}
	var order []string
	for _, line := range strings.Split(string(out), "\n") {
		// The bridge device itself shows the node's packets before they
		// reach a port (before the probe SNAT): only the ports count.
		if strings.HasPrefix(line, nodelab.BridgeName+" ") {
			continue
		}
		where := ""
		if strings.HasPrefix(line, nodelab.LinkName+" ") {
			where = onLink
		}
		m := tcpdumpLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		src, err1 := netip.ParseAddr(m[1])
		dst, err2 := netip.ParseAddr(m[3])
		sport, _ := strconv.Atoi(m[2])
		dport, _ := strconv.Atoi(m[4])
		n, _ := strconv.Atoi(m[5])
		if err1 != nil || err2 != nil {
			continue
		}
		c := conversation{client: src, server: dst, port: uint16(dport)}
		if !servicePorts[uint16(dport)] && servicePorts[uint16(sport)] {
			c = conversation{client: dst, server: src, port: uint16(sport)}
		}
		key := fmt.Sprintf("%s -> %s:%d%s", d.role(c.client), d.role(c.server), c.port, where)
		if convs[key] == nil {
			convs[key] = &c
			order = append(order, key)
		}
		convs[key].packets++
		convs[key].bytes += n
	}
	d.printf("  TCP seen on node1's bridge ports and inter-node link (client -> server:port, packets, payload bytes):\n")
	if len(order) == 0 {
		d.printf("    nothing; tcpdump said:\n")
		d.printIndented(w.Messages())
	}
	for _, k := range order {
		c := convs[k]
		d.printf("    %-52s %4d packets %6d bytes   %s -> %s\n", k, c.packets, c.bytes, c.client, c.server)
	}
	has := func(k string) bool { return convs[k] != nil }
	d.check(has(podA+" -> "+podB+":15008"), "no HBONE connection app-a -> app-b:15008 on the wire")
	d.check(!has(podA+" -> "+podB+":8080"), "app-a -> app-b:8080 went over the wire in plaintext")
	d.check(has(podA+" -> "+podOutside+":8080"), "no passthrough app-a -> outside:8080 on the wire")
	d.check(has(podA+" -> "+podC+":15008"+onLink), "no HBONE connection app-a -> app-c:15008 on the inter-node link")
	d.check(!has(podA+" -> "+podC+":8080"+onLink) && !has(podA+" -> "+podC+":8080"), "app-a -> app-c:8080 went over the wire in plaintext")
	d.check(has("probe -> "+podA+":8080"), "no connection from the probe source to app-a on the wire")
	d.check(!has(d.n1.Name+" -> "+podA+":8080"), "the node reached app-a with its own address: no probe SNAT")

	hello, err := d.tlsRecords(ctx)
	if err != nil {
		return err
	}
	pcap, err := os.ReadFile(w.Path)
	if err != nil {
		return fmt.Errorf("read capture: %w", err)
	}
	secret, remote, open := "app="+podB+" peer=", "app="+podC+" peer=", "app="+podOutside+" peer="
	d.printf("  TLS handshake records (first payload byte 0x16) sent to port 15008: %d\n", hello)
	d.printf("  %q (app-b's answer to app-a, sent over HBONE) in the capture: %v\n", secret, bytes.Contains(pcap, []byte(secret)))
	d.printf("  %q (app-c's answer to app-a, sent over HBONE across nodes) in the capture: %v\n", remote, bytes.Contains(pcap, []byte(remote)))
	d.printf("  %q (outside's answer, passthrough) in the capture: %v\n", open, bytes.Contains(pcap, []byte(open)))
	d.check(hello > 0, "no TLS handshake on port 15008")
	d.check(!bytes.Contains(pcap, []byte(secret)), "app-b's answer crossed the wire in plaintext")
	d.check(!bytes.Contains(pcap, []byte(remote)), "app-c's answer crossed the inter-node link in plaintext")
	d.check(bytes.Contains(pcap, []byte(open)), "the passthrough answer is not in the capture (is the capture blind?)")
	return nil
}

// tlsRecords counts packets to the HBONE port whose payload starts with a
// TLS handshake record (content type 22).
func (d *demo) tlsRecords(ctx context.Context) (int, error) {
	filter := fmt.Sprintf("tcp dst port %d and tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x16", meshconst.InboundHBONEPort)
	out, err := d.wire.Read(ctx, "-q", "-t", filter)
	if err != nil {
		return 0, err
	}
	return len(tcpdumpLine.FindAllString(string(out), -1)), nil
}
