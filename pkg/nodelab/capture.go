//go:build linux

package nodelab

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ambpf/ambpf/pkg/childproc"
	"github.com/ambpf/ambpf/pkg/netlab"
)

// Capture is tcpdump running in a namespace, writing a pcap file.
type Capture struct {
	ns   *netlab.Netns
	Path string
	cmd  *exec.Cmd
	done chan error
	mu   sync.Mutex
	// msgs is tcpdump's stderr, for when the capture comes out empty.
	msgs bytes.Buffer
	// listening is closed when msgs first holds tcpdump's "listening on".
	listening chan struct{}
	stopped   bool
}

// captureMessages is the Capture's stderr writer: it keeps tcpdump's
// messages and closes listening once tcpdump says it listens.
type captureMessages Capture

func (m *captureMessages) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.msgs.Write(p)
	if m.listening != nil && strings.Contains(m.msgs.String(), "listening on") {
		close(m.listening)
		m.listening = nil
	}
	return len(p), nil
}

// StartCapture starts tcpdump in ns on iface ("any" for every device)
// with the pcap filter, writing path, and waits until it listens. Stop
// ends it; Read decodes what it wrote.
func StartCapture(ctx context.Context, ns *netlab.Netns, iface, filter, path string) (*Capture, error) {
	if _, err := exec.LookPath("tcpdump"); err != nil {
		return nil, fmt.Errorf("tcpdump not installed (make deps installs it): %w", err)
	}
	c := &Capture{ns: ns, Path: path, done: make(chan error, 1)}
	// --immediate-mode and -U: take each packet from the kernel and write
	// it at once; otherwise packets still buffered in the kernel (up to a
	// second's worth) are lost when the capture is stopped.
	c.cmd = exec.Command("ip", "netns", "exec", ns.NSName, "tcpdump", "-i", iface, "-nn", "-s", "0", "--immediate-mode", "-U", "-w", path, filter)
	c.listening = make(chan struct{})
	c.cmd.Stderr = (*captureMessages)(c)
	if err := childproc.Start(c.cmd, func(err error) { c.done <- err }); err != nil {
		return nil, fmt.Errorf("start tcpdump: %w", err)
	}
	listening := c.listening
	select {
	case <-listening:
		return c, nil
	case <-ctx.Done():
		c.Stop()
		return nil, ctx.Err()
	case <-time.After(StartWait):
		c.Stop()
		return nil, fmt.Errorf("tcpdump did not start listening within %v", StartWait)
	}
}

// Stop ends the capture (SIGINT flushes the file); it is idempotent.
func (c *Capture) Stop() error {
	if c.stopped {
		return nil
	}
	c.stopped = true
	c.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-c.done:
	case <-time.After(netlab.DefaultStopWait):
		c.cmd.Process.Kill()
		<-c.done
	}
	return nil
}

// Messages is what tcpdump wrote on stderr.
func (c *Capture) Messages() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.msgs.String()
}

// Read stops the capture and decodes it with `tcpdump -r <file> -nn
// <args...>`, in the capture's namespace (the file names interfaces by
// index). args may end with a filter expression.
func (c *Capture) Read(ctx context.Context, args ...string) (string, error) {
	c.Stop()
	out, err := c.ns.Exec(ctx, "tcpdump", append([]string{"-r", c.Path, "-nn"}, args...)...)
	return string(out), err
}
