//go:build linux

// Command ambpfctl enrols pods with the ambpf agent and shows what the
// datapath does. See pkg/ctl.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"

	"github.com/ambpf/ambpf/pkg/ctl"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	err := ctl.New(ctl.Config{
		Socket:  os.Getenv("AMBPF_AGENT_SOCKET"),
		BPFRoot: os.Getenv("AMBPF_BPF_ROOT"),
		Stdout:  os.Stdout,
	}).Run(ctx, os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "ambpfctl:", err)
	}
	stop()
	os.Exit(ctl.ExitCode(err))
}
