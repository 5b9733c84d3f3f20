//go:build linux

// Command ambpf-node runs the real single node of hack/node until SIGINT
// or SIGTERM, then removes it: for trying the chart by hand.
//
//	go run ./hack/node/cmd/ambpf-node --kube-bin .cache/kube/bin/v1.37.2 \
//	    --cni-bin .cache/tools --images .cache/images
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/ambpf/ambpf/hack/node"
)

func main() {
	var cfg node.Config
	flag.StringVar(&cfg.KubeBinDir, "kube-bin", ".cache/kube/bin/v1.37.2", "kubelet, kube-apiserver, ... (hack/kube/build.sh)")
	flag.StringVar(&cfg.CNIBinDir, "cni-bin", ".cache/tools", "bridge, host-local, loopback (hack/tools.sh)")
	flag.StringVar(&cfg.ImageDir, "images", ".cache/images", "image tarballs (hack/image/build.sh)")
	flag.Parse()
	cfg.Logf = func(f string, a ...any) { slog.Info(fmt.Sprintf(f, a...)) }
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	n, err := node.Start(ctx, cfg)
	if err != nil {
		slog.Error("start node", "err", err)
		os.Exit(1)
	}
	fmt.Printf("KUBECONFIG=%s\nnode state: %s\n", n.Kubeconfig, n.Root)
	<-ctx.Done()
	if err := n.Stop(); err != nil {
		slog.Error("stop node", "err", err)
		os.Exit(1)
	}
}
