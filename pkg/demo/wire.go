//go:build linux

package demo

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ambpf/ambpf/pkg/meshconst"
)

// capture is tcpdump running in the node netns on every interface: the
// pods' host veths are the bridge ports, so every packet between pods and
// between the node and a pod is seen (a bridged packet twice: leaving one
// port and entering the other). The summary leaves out what it sees on
// the bridge device itself.
type capture struct {
	cmd  *exec.Cmd
	path string
	done chan error
	// msgs is tcpdump's stderr, shown when the capture comes out empty.
	msgs    bytes.Buffer
	stopped bool
}

// startCapture starts tcpdump and waits until it listens.
func (d *demo) startCapture(ctx context.Context) (*capture, error) {
	if _, err := exec.LookPath("tcpdump"); err != nil {
		return nil, fmt.Errorf("tcpdump not installed (make deps installs it): %w", err)
	}
	c := &capture{path: filepath.Join(d.runDir, "wire.pcap"), done: make(chan error, 1)}
	// --immediate-mode and -U: take each packet from the kernel and write
	// it at once; otherwise packets still buffered in the kernel (up to a
	// second's worth) are lost when the capture is stopped.
	c.cmd = exec.Command("ip", "netns", "exec", d.node.NSName, "tcpdump", "-i", "any", "-nn", "--immediate-mode", "-U", "-w", c.path, "tcp")
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	stderr, err := c.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := c.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start tcpdump: %w", err)
	}
	listening := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		signalled := false
		for sc.Scan() {
			c.msgs.WriteString(sc.Text() + "\n")
			if !signalled && strings.Contains(sc.Text(), "listening on") {
				close(listening)
				signalled = true
			}
		}
		c.done <- c.cmd.Wait()
	}()
	d.onCleanup("tcpdump", c.stop)
	select {
	case <-listening:
		return c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(startWait):
		return nil, fmt.Errorf("tcpdump did not start listening within %v", startWait)
	}
}

// stop ends the capture (SIGINT flushes the file); it is idempotent.
func (c *capture) stop() error {
	if c.stopped {
		return nil
	}
	c.stopped = true
	c.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-c.done:
	case <-time.After(stopWait):
		c.cmd.Process.Kill()
		<-c.done
	}
	return nil
}

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

// showWire stops the capture and shows, per connection, who talked to
// whom on which port, and whether the apps' answers are readable on the
// wire: the mesh -> mesh answer must not be (it travelled in TLS), the
// passthrough one must be (plain TCP, as without a mesh).
func (d *demo) showWire(ctx context.Context) error {
	w := d.wire
	w.stop()

	// Read in the node netns: the capture names interfaces by index.
	out, err := d.node.Exec(ctx, "tcpdump", "-r", w.path, "-nn", "-q", "-t")
	if err != nil {
		return err
	}
	convs := map[string]*conversation{}
	var order []string
	for _, line := range strings.Split(string(out), "\n") {
		// The bridge device itself shows the node's packets before they
		// reach a port (before the probe SNAT): only the ports count.
		if strings.HasPrefix(line, bridgeName+" ") {
			continue
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
		key := fmt.Sprintf("%s -> %s:%d", d.role(c.client), d.role(c.server), c.port)
		if convs[key] == nil {
			convs[key] = &c
			order = append(order, key)
		}
		convs[key].packets++
		convs[key].bytes += n
	}
	d.printf("  TCP seen on the bridge ports (client -> server:port, packets, payload bytes):\n")
	if len(order) == 0 {
		d.printf("    nothing; tcpdump said:\n")
		d.printIndented(w.msgs.String())
	}
	for _, k := range order {
		c := convs[k]
		d.printf("    %-32s %4d packets %6d bytes   %s -> %s\n", k, c.packets, c.bytes, c.client, c.server)
	}
	has := func(k string) bool { return convs[k] != nil }
	d.check(has(podA+" -> "+podB+":15008"), "no HBONE connection app-a -> app-b:15008 on the wire")
	d.check(!has(podA+" -> "+podB+":8080"), "app-a -> app-b:8080 went over the wire in plaintext")
	d.check(has(podA+" -> "+podOutside+":8080"), "no passthrough app-a -> outside:8080 on the wire")
	d.check(has("probe -> "+podA+":8080"), "no connection from the probe source to app-a on the wire")
	d.check(!has("node -> "+podA+":8080"), "the node reached app-a with its own address: no probe SNAT")

	hello, err := d.tlsRecords(ctx, w.path)
	if err != nil {
		return err
	}
	pcap, err := os.ReadFile(w.path)
	if err != nil {
		return fmt.Errorf("read capture: %w", err)
	}
	secret, open := "app="+podB+" peer=", "app="+podOutside+" peer="
	d.printf("  TLS handshake records (first payload byte 0x16) sent to port 15008: %d\n", hello)
	d.printf("  %q (app-b's answer to app-a, sent over HBONE) in the capture: %v\n", secret, bytes.Contains(pcap, []byte(secret)))
	d.printf("  %q (outside's answer, passthrough) in the capture: %v\n", open, bytes.Contains(pcap, []byte(open)))
	d.check(hello > 0, "no TLS handshake on port 15008")
	d.check(!bytes.Contains(pcap, []byte(secret)), "app-b's answer crossed the wire in plaintext")
	d.check(bytes.Contains(pcap, []byte(open)), "the passthrough answer is not in the capture (is the capture blind?)")
	return nil
}

// tlsRecords counts packets to the HBONE port whose payload starts with a
// TLS handshake record (content type 22).
func (d *demo) tlsRecords(ctx context.Context, path string) (int, error) {
	filter := fmt.Sprintf("tcp dst port %d and tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x16", meshconst.InboundHBONEPort)
	out, err := d.node.Exec(ctx, "tcpdump", "-r", path, "-nn", "-q", "-t", filter)
	if err != nil {
		return 0, err
	}
	return len(tcpdumpLine.FindAllString(string(out), -1)), nil
}
