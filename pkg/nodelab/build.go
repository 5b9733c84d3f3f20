//go:build linux

package nodelab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// RepoRoot returns the directory holding go.mod at or above dir.
func RepoRoot(dir string) (string, error) {
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		if filepath.Dir(dir) == dir {
			return "", errors.New("no go.mod above " + dir)
		}
		dir = filepath.Dir(dir)
	}
}

// BuildBinaries builds AmbpfBinaries from the repository at root into
// binDir with go build, and makes sure hack/tools.sh has built the CNI
// tools into toolsDir (<root>/.cache/tools when empty). It returns the
// tools directory. Tests call it once per package.
func BuildBinaries(root, binDir, toolsDir string) (string, error) {
	if err := BuildCommands(root, binDir, AmbpfBinaries...); err != nil {
		return "", err
	}
	if toolsDir == "" {
		toolsDir = filepath.Join(root, ".cache", "tools")
	}
	cmd := exec.Command(filepath.Join(root, "hack", "tools.sh"))
	cmd.Env = append(os.Environ(), "AMBPF_TOOLS_DIR="+toolsDir)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("hack/tools.sh: %w\n%s", err, out)
	}
	return toolsDir, nil
}

// BuildCommands builds ./cmd/<name> of the repository at root, for each
// name, into binDir with go build.
func BuildCommands(root, binDir string, names ...string) error {
	pkgs := make([]string, len(names))
	for i, n := range names {
		pkgs[i] = "./cmd/" + n
	}
	return BuildPackages(root, binDir, pkgs...)
}

// BuildPackages builds the main packages pkgs (paths relative to root,
// such as ./hack/bench/relay) into binDir with go build; each binary is
// named for its package's last path element.
func BuildPackages(root, binDir string, pkgs ...string) error {
	args := append([]string{"build", "-o", binDir + "/"}, pkgs...)
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %w\n%s", err, out)
	}
	return nil
}

// BinaryCache builds the ambpf binaries once per test process, for the
// test packages that run them (Get), into a temporary directory that
// Remove deletes (call it from TestMain once the tests have run).
type BinaryCache struct {
	// Prefix names the temporary directory.
	Prefix string

	once     sync.Once
	bins     string
	tools    string
	buildErr error
}

// Get returns the binaries' directory and the CNI tools' directory,
// building them on the first call; a build failure fails tb.
func (c *BinaryCache) Get(tb testing.TB) (bins, tools string) {
	tb.Helper()
	c.once.Do(func() {
		wd, err := os.Getwd()
		if err != nil {
			c.buildErr = err
			return
		}
		root, err := RepoRoot(wd)
		if err != nil {
			c.buildErr = err
			return
		}
		if c.bins, c.buildErr = os.MkdirTemp("", c.Prefix); c.buildErr != nil {
			return
		}
		c.tools, c.buildErr = BuildBinaries(root, c.bins, os.Getenv("AMBPF_TOOLS_DIR"))
	})
	if c.buildErr != nil {
		tb.Fatal(c.buildErr)
	}
	return c.bins, c.tools
}

// Dir is where Get built the binaries; empty before it ran.
func (c *BinaryCache) Dir() string { return c.bins }

// Remove deletes what Get built.
func (c *BinaryCache) Remove() {
	if c.bins != "" {
		os.RemoveAll(c.bins)
	}
}
