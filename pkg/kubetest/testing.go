//go:build linux

package kubetest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"
)

// buildTimeout bounds the first build of the binaries (about 5 minutes on
// 2 cores when the module cache is cold).
const buildTimeout = 20 * time.Minute

// errBuild marks a failure to obtain the binaries, which skips instead of
// failing on a developer machine without root (and usually without the
// toolchain or network the build needs). CI runs as root, where it fails.
var errBuild = errors.New("kubetest: control-plane binaries unavailable")

// Start builds the binaries if needed, starts a control plane for t and
// stops it (removing its files) when t ends, whatever the outcome.
func Start(t testing.TB) *ControlPlane {
	t.Helper()
	cp, err := launch()
	if err != nil {
		failOrSkip(t, err)
	}
	t.Cleanup(func() {
		if err := cp.Stop(); err != nil {
			t.Errorf("stop control plane: %v", err)
		}
	})
	return cp
}

func launch() (*ControlPlane, error) {
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	binDir, err := EnsureBinaries(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errBuild, err)
	}
	return New(ctx, binDir)
}

func failOrSkip(t testing.TB, err error) {
	t.Helper()
	if errors.Is(err, errBuild) && os.Geteuid() != 0 {
		t.Skipf("not root and the control plane cannot be built here (CI runs as root and builds it): %v", err)
	}
	t.Fatalf("start control plane: %v", err)
}

// shared is the control plane of RunShared, started on first use.
var shared struct {
	once sync.Once
	cp   *ControlPlane
	err  error
}

// RunShared runs a package's tests with one control plane shared among
// them, started by the first Shared call (none when no test asks) and
// stopped after the last test. Use it as the package's TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(kubetest.RunShared(m)) }
//
// Tests sharing a control plane must keep to their own namespaces.
func RunShared(m *testing.M) int {
	code := m.Run()
	if shared.cp != nil {
		if err := shared.cp.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "kubetest: stop shared control plane: %v\n", err)
			if code == 0 {
				code = 1
			}
		}
	}
	return code
}

// Shared returns the control plane RunShared manages, starting it on the
// first call; t fails (or skips, as in Start) when it could not start.
func Shared(t testing.TB) *ControlPlane {
	t.Helper()
	shared.once.Do(func() { shared.cp, shared.err = launch() })
	if shared.err != nil {
		failOrSkip(t, shared.err)
	}
	return shared.cp
}
