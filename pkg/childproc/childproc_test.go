//go:build linux

package childproc

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// TestChildOutlivesDiscardedThread starts two children from a goroutine
// that locks its thread and returns without unlocking, so the runtime
// ends that thread: one with exec directly (the control), one through
// Start. The thread's exit kills the control (that is the kernel's
// parent-death signal, and proves the exit happened); the child Start
// forked must still run.
func TestChildOutlivesDiscardedThread(t *testing.T) {
	if _, err := exec.LookPath("sleep"); err != nil {
		t.Skipf("no sleep binary: %v", err)
	}
	control := exec.Command("sleep", "60")
	control.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	child := exec.Command("sleep", "60")
	childExit := make(chan error, 1)
	errs := make(chan error, 1)
	// The runtime never ends the process's main thread (it parks it
	// instead), so the forking goroutine must not be on it: a goroutine
	// that finds itself there keeps it, locked, until the test ends.
	release := make(chan struct{})
	defer close(release)
	var doomed func()
	doomed = func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if syscall.Gettid() == os.Getpid() {
			go doomed()
			<-release
			return
		}
		if err := control.Start(); err != nil {
			errs <- err
			return
		}
		errs <- Start(child, func(err error) { childExit <- err })
	}
	go doomed()
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		control.Process.Kill()
		child.Process.Kill()
		<-childExit
	})
	controlExit := make(chan error, 1)
	go func() { controlExit <- control.Wait() }()
	select {
	case err := <-controlExit:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("control child ended with %v, want SIGKILL from its thread's exit", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the control child did not get its parent-death signal within 30s: the forking thread did not end, so the test proves nothing")
	}
	select {
	case err := <-childExit:
		t.Fatalf("the child started through Start died with the caller's thread: %v", err)
	default:
	}
	if err := child.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("child %d: %v", child.Process.Pid, err)
	}
	if pgid, err := syscall.Getpgid(child.Process.Pid); err != nil || pgid != child.Process.Pid {
		t.Fatalf("child's process group = %d (%v), want its own (%d)", pgid, err, child.Process.Pid)
	}
}

// TestStartError reports a missing binary as an error, with no goroutine
// left waiting.
func TestStartError(t *testing.T) {
	called := false
	err := Start(exec.Command(fmt.Sprintf("/nonexistent/%d", os.Getpid())), func(error) { called = true })
	if err == nil {
		t.Fatal("Start of a missing binary succeeded")
	}
	if called {
		t.Fatal("exited called for a child that never started")
	}
}
