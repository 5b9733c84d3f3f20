//go:build linux

package kubetest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/ambpf/ambpf/pkg/childproc"
)

// process is a control-plane server running in its own process group with
// its output in a log file.
type process struct {
	name string
	log  string
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has been reaped
	err  error         // Wait's result, valid after done
}

// startProcess starts bin with args and the test's environment, output
// to logPath (see startProcessEnv).
func startProcess(name, bin string, args []string, logPath string) (*process, error) {
	return startProcessEnv(name, bin, args, nil, logPath)
}

// startProcessEnv starts bin with args, output to logPath. A non-nil env
// is the whole environment (a pod's env), nil inherits the test's.
//
// The child dies with the test binary and not before (pkg/childproc).
func startProcessEnv(name, bin string, args, env []string, logPath string) (*process, error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("create %s log: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logf, logf
	p := &process{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	err = childproc.Start(cmd, func(err error) {
		p.err = err
		logf.Close()
		close(p.done)
	})
	if err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return p, nil
}

// exited reports whether the process has ended.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// logTail returns the last lines of the process log.
func (p *process) logTail(n int) string {
	b, err := os.ReadFile(p.log)
	if err != nil {
		return fmt.Sprintf("(read %s: %v)", p.log, err)
	}
	return lastLines(string(b), n)
}

// stop sends SIGTERM to the process group, SIGKILL after grace, and waits
// for the process to be reaped. Anything left in the group is killed.
func (p *process) stop(grace time.Duration) error {
	pgid := p.cmd.Process.Pid
	if !p.exited() {
		if err := syscall.Kill(-pgid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("signal %s: %w", p.name, err)
		}
		select {
		case <-p.done:
		case <-time.After(grace):
		}
	}
	if err := syscall.Kill(-pgid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill %s: %w", p.name, err)
	}
	<-p.done
	return nil
}

// Process is a program started by StartProcess.
type Process struct{ p *process }

// StartProcess starts bin with args, output to logPath, in its own
// process group, killed if the test dies (see startProcessEnv); a nil env
// inherits the test's. For the programs of a real node (hack/node).
func StartProcess(name, bin string, args, env []string, logPath string) (*Process, error) {
	p, err := startProcessEnv(name, bin, args, env, logPath)
	if err != nil {
		return nil, err
	}
	return &Process{p: p}, nil
}

// Stop sends SIGTERM to the process group, SIGKILL after grace, and waits.
func (p *Process) Stop(grace time.Duration) error { return p.p.stop(grace) }

// Exited reports whether the process has ended.
func (p *Process) Exited() bool { return p.p.exited() }

// LogTail returns the last n lines of the process log.
func (p *Process) LogTail(n int) string { return p.p.logTail(n) }

// Pid is the process id (and process group id).
func (p *Process) Pid() int { return p.p.cmd.Process.Pid }
