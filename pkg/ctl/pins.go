//go:build linux

package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/ambpf/ambpf/pkg/dpstate"
)

// agentBinary is the agent's executable name.
const agentBinary = "ambpf-agent"

// pinReader reads a pod's datapath from the pins without the agent's API:
// it runs `ambpf-agent inspect-pins`, which links the loader, so ambpfctl
// need not (it stays a small API client, like ambpf-cni).
type pinReader struct {
	root     string // bpffs directory of the pins
	agentBin string // ambpf-agent to run; found when empty
}

// binary is the ambpf-agent to run: the configured one, else the one
// beside this executable, else the one on PATH.
func (r pinReader) binary() (string, error) {
	if r.agentBin != "" {
		return r.agentBin, nil
	}
	if self, err := os.Executable(); err == nil {
		beside := filepath.Join(filepath.Dir(self), agentBinary)
		if st, err := os.Stat(beside); err == nil && st.Mode().IsRegular() {
			return beside, nil
		}
	}
	path, err := exec.LookPath(agentBinary)
	if err != nil {
		return "", fmt.Errorf("--pins reads the pins with %s, not found beside ambpfctl or on PATH (--agent-bin): %w", agentBinary, err)
	}
	return path, nil
}

// read returns the pod's datapath as the pins say.
func (r pinReader) read(ctx context.Context, uid string) (dpstate.Status, error) {
	bin, err := r.binary()
	if err != nil {
		return dpstate.Status{}, err
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "inspect-pins", "--bpf-root", r.root, uid)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(stderr.String()), agentBinary+":"))
		var ee *exec.ExitError
		if errors.As(err, &ee) && msg != "" {
			return dpstate.Status{}, errors.New(msg)
		}
		return dpstate.Status{}, fmt.Errorf("%s inspect-pins: %w: %s", bin, err, msg)
	}
	var st dpstate.Status
	if err := json.Unmarshal(stdout.Bytes(), &st); err != nil {
		return dpstate.Status{}, fmt.Errorf("%s inspect-pins: %w", bin, err)
	}
	return st, nil
}
