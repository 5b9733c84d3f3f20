//go:build linux

package demo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ambpf/ambpf/pkg/agentapi"
)

const (
	// metricsAddr is where the proxy serves /metrics, in the node netns.
	metricsAddr = "127.0.0.1:15020"
	startWait   = 15 * time.Second
	stopWait    = 5 * time.Second
)

func randomID() string {
	var b [3]byte
	rand.Read(b[:]) // never fails (crypto/rand panics instead)
	return hex.EncodeToString(b[:])
}

// process is an ambpf binary the demo runs inside the node namespace.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed when the process has been reaped
	err     error         // Wait's result, valid after done
}

// startProcess runs bin with args inside the node's network namespace
// (through `nsenter --net`, which execs it: the pid is the binary's; unlike
// `ip netns exec` it keeps the mount namespace, where the agent finds the
// cgroup2 hierarchy), its output in <run>/<name>.log. With cgroupDir set it
// starts in that cgroup. It runs in its own process group, so a Ctrl-C at
// the terminal reaches only the demo, which then stops it in order, and it
// gets SIGTERM if the demo dies. The cleanup stops it.
func (d *demo) startProcess(ctx context.Context, name, cgroupDir, bin string, args ...string) (*process, error) {
	p := &process{name: name, logPath: filepath.Join(d.runDir, name+".log"), done: make(chan struct{})}
	f, err := os.Create(p.logPath)
	if err != nil {
		return nil, fmt.Errorf("%s log: %w", name, err)
	}
	var w io.Writer = f
	if d.cfg.Logs != nil {
		w = io.MultiWriter(f, d.cfg.Logs)
	}
	p.cmd = exec.Command("nsenter", append([]string{"--net=" + d.node.NSPath, bin}, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = w, w
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if cgroupDir != "" {
		cg, err := os.Open(cgroupDir)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("start %s: %w", name, err)
		}
		defer cg.Close() // the child is in it from its first instruction
		p.cmd.SysProcAttr.UseCgroupFD, p.cmd.SysProcAttr.CgroupFD = true, int(cg.Fd())
	}
	if err := p.cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		f.Close()
		close(p.done)
	}()
	d.onCleanup(name+" process", p.stop)
	return p, nil
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, waits for a clean exit and kills the process when it
// does not come. A process that had already died is an error.
func (p *process) stop() error {
	if p.exited() {
		return fmt.Errorf("%s had exited before the demo stopped it: %v (log: %s)", p.name, p.err, p.logPath)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("%s exited with %v (log: %s)", p.name, p.err, p.logPath)
		}
		return nil
	case <-time.After(stopWait):
	}
	p.cmd.Process.Kill()
	<-p.done
	return fmt.Errorf("%s did not stop within %v on SIGTERM: killed", p.name, stopWait)
}

// tail returns the last n lines of the process's log.
func (p *process) tail(n int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// printLogTails shows the end of the agent's and proxy's logs after a
// failure.
func (d *demo) printLogTails() {
	for _, p := range []*process{d.agent, d.proxy} {
		if p == nil {
			continue
		}
		d.printf("\n  last lines of the %s log (%s):\n", p.name, p.logPath)
		d.printIndented(p.tail(15))
	}
}

// waitAgent waits until the agent answers ready and ok(synced proxies)
// holds.
func (d *demo) waitAgent(ctx context.Context, ok func(synced int) bool) error {
	c := agentapi.NewClient(d.apiSocket())
	deadline := time.Now().Add(startWait)
	var last error
	for {
		st, err := c.Status(ctx)
		if err == nil && st.Ready && ok(st.Proxy.Synced) {
			return nil
		}
		last = err
		if err == nil {
			last = fmt.Errorf("ready=%t, %d proxies synced", st.Ready, st.Proxy.Synced)
		}
		for _, p := range []*process{d.agent, d.proxy} {
			if p != nil && p.exited() {
				return fmt.Errorf("%s exited: %v\n%s", p.name, p.err, p.tail(10))
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("agent not ready after %v: %w", startWait, last)
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
