//go:build linux

package nodelab

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

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
	msgs    bytes.Buffer
	stopped bool
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
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
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
			c.mu.Lock()
			c.msgs.WriteString(sc.Text() + "\n")
			c.mu.Unlock()
			if !signalled && strings.Contains(sc.Text(), "listening on") {
				close(listening)
				signalled = true
			}
		}
		c.done <- c.cmd.Wait()
	}()
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
