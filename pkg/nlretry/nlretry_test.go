//go:build linux

package nlretry

import (
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// The retry logic itself, with a scripted dump standing in for the kernel.

func TestDoDiscardsInterruptedResults(t *testing.T) {
	var pauses int
	sleep = func(time.Duration) { pauses++ }
	t.Cleanup(func() { sleep = time.Sleep })

	calls := 0
	got, err := Do(func() ([]string, error) {
		calls++
		if calls < 3 {
			// What netlink v1.3.1 does: the partial result and the error.
			return []string{"partial"}, netlink.ErrDumpInterrupted
		}
		return []string{"a", "b"}, nil
	})
	if err != nil {
		t.Fatalf("Do: %v", err)
	}
	if len(got) != 2 || got[0] != "a" || calls != 3 || pauses != 2 {
		t.Fatalf("got %v after %d calls and %d pauses; want [a b] after 3 calls and 2 pauses", got, calls, pauses)
	}
}

func TestDoGivesUpAfterAttempts(t *testing.T) {
	var waited time.Duration
	sleep = func(d time.Duration) { waited += d }
	t.Cleanup(func() { sleep = time.Sleep })

	calls := 0
	got, err := Do(func() ([]string, error) {
		calls++
		return []string{"partial"}, netlink.ErrDumpInterrupted
	})
	if !errors.Is(err, netlink.ErrDumpInterrupted) || got != nil || calls != Attempts {
		t.Fatalf("got %v, %v after %d calls; want nil and ErrDumpInterrupted after %d", got, err, calls, Attempts)
	}
	if waited > 100*time.Millisecond {
		t.Fatalf("waited %v in all; the backoff must stay tiny", waited)
	}
}

func TestDoReturnsOtherErrorsAtOnce(t *testing.T) {
	calls := 0
	_, err := Do(func() (int, error) {
		calls++
		return 1, syscall.ENODEV
	})
	if !errors.Is(err, syscall.ENODEV) || calls != 1 {
		t.Fatalf("got %v after %d calls; want ENODEV after 1", err, calls)
	}
}
