//go:build linux

package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"github.com/ambpf/ambpf/pkg/datapath"
)

// inspectPinsCommand names the subcommand that reads one pod's datapath
// from the pins.
const inspectPinsCommand = "inspect-pins"

// inspectPins is `ambpf-agent inspect-pins [--bpf-root DIR] UID`: one pod's
// datapath as the pins in bpffs say, printed as JSON (dpstate.Status), with
// no agent running. `ambpfctl inspect --pins` runs it, so that ambpfctl
// itself links no BPF loader (cilium/ebpf and the embedded objects) and
// still reads a node whose agent is down.
func inspectPins(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet(inspectPinsCommand, flag.ContinueOnError)
	root := fs.String("bpf-root", datapath.DefaultRoot, "bpffs directory of the datapath pins")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%s: want one pod UID, got %q", inspectPinsCommand, fs.Args())
	}
	uid := fs.Arg(0)
	l, err := datapath.New(datapath.Config{Root: *root, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return fmt.Errorf("inspect %s: %w", uid, err)
	}
	st, err := l.Get(uid)
	if err != nil {
		return fmt.Errorf("inspect %s: %w", uid, err)
	}
	return json.NewEncoder(stdout).Encode(st)
}
