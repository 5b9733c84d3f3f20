//go:build linux

package netlab

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/ambpf/ambpf/pkg/childproc"
)

// DefaultStopWait is how long Process.Stop waits after SIGTERM before it
// kills, when ProcessConfig.StopWait is zero.
const DefaultStopWait = 5 * time.Second

// ProcessConfig says how to start a Process.
type ProcessConfig struct {
	// Name names the process in errors ("agent", "node2 proxy").
	Name string
	// NetnsPath is the network namespace to run in (/run/netns/<name>);
	// empty runs in the caller's.
	NetnsPath string
	// CgroupDir, when set, is the cgroup v2 directory the process starts
	// in, from its first instruction (clone into the cgroup).
	CgroupDir string
	// Bin and Args are the program and its arguments.
	Bin  string
	Args []string
	// Env is added to the caller's environment.
	Env []string
	// LogPath receives the process's stdout and stderr (created or
	// truncated). Required.
	LogPath string
	// Logs, when set, also receives the output.
	Logs io.Writer
	// StopWait is how long Stop waits for an exit after SIGTERM;
	// DefaultStopWait when zero.
	StopWait time.Duration
}

// Process is a program started by StartProcess: one of the project's
// binaries run the way a node runs it, for tests and the demo.
type Process struct {
	cfg     ProcessConfig
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has been reaped
	err     error         // Wait's result, valid after done
	stopped bool          // Stop or Kill was called
}

// StartProcess starts cfg.Bin. With cfg.NetnsPath set it runs through
// `nsenter --net=<path>`, which execs the binary (the pid is the binary's)
// and, unlike `ip netns exec`, keeps the mount namespace, where the agent
// finds the cgroup2 hierarchy. The process gets its own process group (a
// Ctrl-C at the terminal reaches only the caller, which then stops it in
// order) and SIGKILL if the caller dies: nothing outlives the caller
// (pkg/childproc). The caller owns stopping it (Stop or Kill).
func StartProcess(cfg ProcessConfig) (*Process, error) {
	if cfg.StopWait <= 0 {
		cfg.StopWait = DefaultStopWait
	}
	f, err := os.Create(cfg.LogPath)
	if err != nil {
		return nil, fmt.Errorf("%s log: %w", cfg.Name, err)
	}
	var w io.Writer = f
	if cfg.Logs != nil {
		w = io.MultiWriter(f, cfg.Logs)
	}
	p := &Process{cfg: cfg, done: make(chan struct{})}
	if cfg.NetnsPath != "" {
		p.cmd = exec.Command("nsenter", append([]string{"--net=" + cfg.NetnsPath, cfg.Bin}, cfg.Args...)...)
	} else {
		p.cmd = exec.Command(cfg.Bin, cfg.Args...)
	}
	p.cmd.Stdout, p.cmd.Stderr = w, w
	if len(cfg.Env) > 0 {
		p.cmd.Env = append(os.Environ(), cfg.Env...)
	}
	if cfg.CgroupDir != "" {
		cg, err := os.Open(cfg.CgroupDir)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("start %s: %w", cfg.Name, err)
		}
		defer cg.Close() // the child is in it from its first instruction
		p.cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	}
	err = childproc.Start(p.cmd, func(err error) {
		p.err = err
		f.Close()
		close(p.done)
	})
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", cfg.Name, err)
	}
	return p, nil
}

// Name is ProcessConfig.Name.
func (p *Process) Name() string { return p.cfg.Name }

// Pid is the process's id (the binary's: nsenter execs it).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// LogPath is where its output goes.
func (p *Process) LogPath() string { return p.cfg.LogPath }

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err is the exit error once Exited.
func (p *Process) Err() error {
	if !p.Exited() {
		return nil
	}
	return p.err
}

// Done is closed when the process has ended.
func (p *Process) Done() <-chan struct{} { return p.done }

// Stop sends SIGTERM, waits for a clean exit and kills the process when it
// does not come. A process that had died before (not through Stop or Kill)
// is an error, as is a non-zero exit. A second Stop does nothing.
func (p *Process) Stop() error {
	if p.stopped {
		<-p.done
		return nil
	}
	p.stopped = true
	if p.Exited() {
		return fmt.Errorf("%s had exited before it was stopped: %v (log: %s)", p.cfg.Name, p.err, p.cfg.LogPath)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("%s exited with %v (log: %s)", p.cfg.Name, p.err, p.cfg.LogPath)
		}
		return nil
	case <-time.After(p.cfg.StopWait):
	}
	p.cmd.Process.Kill()
	<-p.done
	return fmt.Errorf("%s did not stop within %v on SIGTERM: killed", p.cfg.Name, p.cfg.StopWait)
}

// Signal sends sig to the process.
func (p *Process) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Kill sends SIGKILL and waits until the process is reaped.
func (p *Process) Kill() {
	p.stopped = true
	p.cmd.Process.Kill()
	<-p.done
}

// Tail returns the last n lines of the process's log.
func (p *Process) Tail(n int) string {
	b, err := os.ReadFile(p.cfg.LogPath)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
