//go:build linux

// Command probe prints the kernel mechanisms the datapath loader picks on
// the running kernel, as the loader itself reports them. The kernel matrix
// runs it inside each guest before the tests, so the table shows what a
// real agent would choose there, not what a test forced.
//
// It prepares a Loader on a bpffs directory of its own (created, then
// removed) and attaches nothing.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"

	"github.com/ambpf/ambpf/pkg/datapath"
)

func main() {
	root := flag.String("root", "/sys/fs/bpf/kernel-matrix-probe", "bpffs directory for the loader; removed on exit")
	flag.Parse()
	if err := run(*root); err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
}

func run(root string) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	l, err := datapath.New(datapath.Config{Root: root, Logger: log})
	if err != nil {
		return fmt.Errorf("prepare loader on %s: %w", root, err)
	}
	defer os.RemoveAll(root)
	// One line the report parses: the loader's own summary.
	fmt.Printf("features %s\n", l.Features())
	return nil
}
