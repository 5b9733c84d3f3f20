// Command ambpf-cni-install installs the ambpf-cni plugin on a node (copies
// the binary, chains it into the primary CNI configuration), keeps it
// chained with -watch, and removes it with -uninstall. See pkg/cniinstall.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/cniinstall"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "ambpf-cni-install:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		cfg                 cniinstall.Config
		agentSocket, dsName string
		dnsCapture          bool
		watch, uninstall    bool
		printConfig         bool
		level               slog.Level
	)
	fs := flag.NewFlagSet("ambpf-cni-install", flag.ContinueOnError)
	fs.StringVar(&cfg.Binary, "binary", "/opt/ambpf/bin/ambpf-cni", "ambpf-cni binary to install")
	fs.StringVar(&cfg.BinDir, "cni-bin-dir", "/host/opt/cni/bin", "node CNI bin dir (host mount)")
	fs.StringVar(&cfg.ConfDir, "cni-conf-dir", "/host/etc/cni/net.d", "node CNI conf dir (host mount)")
	fs.StringVar(&agentSocket, "agent-socket", agentapi.DefaultSocket, "agent enrolment socket, as the host sees it")
	fs.BoolVar(&dnsCapture, "dns-capture", false, "capture DNS of new pods (the plugin's dns_capture)")
	fs.DurationVar(&cfg.PollInterval, "poll-interval", cniinstall.DefaultPollInterval, "conf dir poll period")
	fs.BoolVar(&watch, "watch", false, "after installing, keep the entry chained until terminated")
	fs.BoolVar(&uninstall, "uninstall", false, "remove the chained entry and the binary")
	fs.StringVar(&cfg.Marker, "uninstall-marker", "", "file an -uninstall creates and a -watch on the same storage honours: it stops chaining (and undoes a racing install) once the file exists")
	fs.StringVar(&dsName, "if-daemonset-gone", "", "with -uninstall: only when DaemonSet namespace/name is deleted or being deleted (in-cluster API); API errors uninstall")
	fs.TextVar(&level, "log-level", slog.LevelInfo, "debug, info, warn or error")
	fs.BoolVar(&printConfig, "print-config", false, "print the configuration as JSON and exit")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg.Logger = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	cfg.Plugin = map[string]any{"agent_socket": agentSocket}
	if dnsCapture {
		cfg.Plugin["dns_capture"] = true
	}
	if printConfig {
		printable := cfg
		printable.Logger = nil
		return json.NewEncoder(os.Stdout).Encode(map[string]any{
			"config": printable, "logLevel": level.String(),
			"watch": watch, "uninstall": uninstall, "ifDaemonSetGone": dsName,
		})
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	switch {
	case uninstall:
		if dsName != "" && !daemonSetGone(ctx, cfg.Logger, dsName) {
			cfg.Logger.Info("daemonset still present: keeping ambpf-cni chained", "daemonset", dsName)
			return nil
		}
		return cniinstall.Uninstall(cfg)
	case watch:
		return cniinstall.Watch(ctx, cfg)
	default:
		return installOnce(ctx, cfg)
	}
}

// installOnce installs, waiting for the primary CNI to write its
// configuration when there is none yet.
func installOnce(ctx context.Context, cfg cniinstall.Config) error {
	for {
		err := cniinstall.Install(cfg)
		if !errors.Is(err, cniinstall.ErrNoPrimary) {
			return err
		}
		cfg.Logger.Info("waiting for a primary CNI configuration", "dir", cfg.ConfDir)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(cfg.PollInterval):
		}
	}
}

// daemonSetGone asks the API server whether ns/name is gone. When it
// cannot tell it answers true: an entry left behind with no agent would
// make every new pod on the node fail, while a pod started uncaptured is
// enrolled later by the agent's pod watch.
func daemonSetGone(ctx context.Context, log *slog.Logger, nsName string) bool {
	ns, name, ok := strings.Cut(nsName, "/")
	if !ok {
		log.Warn("-if-daemonset-gone wants namespace/name; uninstalling", "value", nsName)
		return true
	}
	rc, err := rest.InClusterConfig()
	var client kubernetes.Interface
	if err == nil {
		client, err = kubernetes.NewForConfig(rc)
	}
	var gone bool
	if err == nil {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		gone, err = cniinstall.DaemonSetGone(ctx, client, ns, name)
	}
	if err != nil {
		log.Warn("cannot tell whether the daemonset is gone; uninstalling", "err", err)
		return true
	}
	return gone
}
