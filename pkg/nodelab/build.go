//go:build linux

package nodelab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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
	args := []string{"build", "-o", binDir + "/"}
	for _, b := range AmbpfBinaries {
		args = append(args, "./cmd/"+b)
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %w\n%s", err, out)
	}
	if toolsDir == "" {
		toolsDir = filepath.Join(root, ".cache", "tools")
	}
	cmd = exec.Command(filepath.Join(root, "hack", "tools.sh"))
	cmd.Env = append(os.Environ(), "AMBPF_TOOLS_DIR="+toolsDir)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("hack/tools.sh: %w\n%s", err, out)
	}
	return toolsDir, nil
}
