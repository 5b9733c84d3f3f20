package kubetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// binaries names the programs a control plane and the chart tests run.
var binaries = []string{"etcd", "kube-apiserver", "kubectl", "helm"}

// EnsureBinaries returns the directory holding etcd, kube-apiserver,
// kubectl and helm, running hack/kube/build.sh first. The script only
// builds what is missing or stale (about 5 minutes the first time on
// 2 cores, instant afterwards) and serialises concurrent callers with a
// lock, so every test package may call this. AMBPF_KUBE_BIN_DIR in the
// environment moves the directory (the script reads it).
func EnsureBinaries(ctx context.Context) (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	script := filepath.Join(root, "hack", "kube", "build.sh")
	cmd := exec.CommandContext(ctx, script)
	cmd.Dir = filepath.Dir(script)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	// Progress lines go to the test binary's stderr so a long first build
	// is visible in `go test -v` and in CI logs.
	cmd.Stderr = &teeWriter{buf: &stderr, w: os.Stderr}
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("run %s: %w: %s", script, err, lastLines(stderr.String(), 20))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	dir := lines[len(lines)-1]
	for _, b := range binaries {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return "", fmt.Errorf("%s did not produce %s: %w", script, b, err)
		}
	}
	return dir, nil
}

// repoRoot finds the ambpf checkout from the working directory (go test
// runs each package in its own directory) by walking up to hack/kube.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("getwd: %w", err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "hack", "kube", "build.sh")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", errors.New("hack/kube/build.sh not found above " + dir)
		}
	}
}

type teeWriter struct {
	buf *bytes.Buffer
	w   *os.File
}

func (t *teeWriter) Write(p []byte) (int, error) {
	t.buf.Write(p)
	return t.w.Write(p)
}

// lastLines returns at most n trailing lines of s, for error messages that
// quote a process log.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
