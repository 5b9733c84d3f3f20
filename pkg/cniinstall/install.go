package cniinstall

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// DefaultPollInterval is how often Watch re-reads the conf dir.
const DefaultPollInterval = 5 * time.Second

// Config says what to install where.
type Config struct {
	// Binary is the ambpf-cni executable to copy (inside the image).
	Binary string
	// BinDir is the node's CNI bin dir (a host mount), e.g. /host/opt/cni/bin.
	BinDir string
	// ConfDir is the node's CNI conf dir (a host mount), e.g. /host/etc/cni/net.d.
	ConfDir string
	// Plugin holds the chained entry's fields besides "type" (for
	// example agent_socket, dns_capture); may be nil.
	Plugin map[string]any
	// PollInterval is Watch's period; DefaultPollInterval when zero.
	PollInterval time.Duration
	// Marker, when set, is a file Uninstall creates before it unchains,
	// on storage Watch's process shares (the pod's emptyDir). An
	// uninstall runs as the watching container's preStop hook, before
	// the container gets SIGTERM: without the marker, a poll of Watch
	// in between chained the entry again and the node was left with a
	// plugin whose agent was gone, failing every pod's CNI ADD and DEL.
	Marker string
	// Logger; slog.Default() when nil.
	Logger *slog.Logger
}

func (c *Config) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.Default()
	}
	return c.Logger
}

// Entry returns the plugin entry Install chains.
func (c *Config) Entry() map[string]any {
	e := make(map[string]any, len(c.Plugin)+1)
	for k, v := range c.Plugin {
		e[k] = v
	}
	e["type"] = PluginType
	return e
}

// Install copies the binary into BinDir, then chains the entry into the
// primary configuration (binary first: a chained entry whose binary is
// missing fails every pod). It is idempotent. ErrNoPrimary (wrapped) means
// the primary CNI has not written its configuration yet.
func Install(cfg Config) error {
	if err := InstallBinary(cfg.Binary, cfg.BinDir); err != nil {
		return err
	}
	path, changed, err := Chain(cfg.ConfDir, cfg.Entry())
	if err != nil {
		return err
	}
	if changed {
		cfg.logger().Info("chained ambpf-cni", "conf", path)
	}
	return nil
}

// Uninstall unchains the entry from every configuration in ConfDir, then
// removes the binary (entry first, for the same reason as Install).
func Uninstall(cfg Config) error {
	if cfg.Marker != "" {
		if err := os.WriteFile(cfg.Marker, nil, 0o600); err != nil {
			// Unchain all the same: a watch racing it is the lesser harm.
			cfg.logger().Warn("cannot mark the uninstall for the watching process", "marker", cfg.Marker, "err", err)
		}
	}
	files, err := Unchain(cfg.ConfDir)
	for _, f := range files {
		cfg.logger().Info("unchained ambpf-cni", "conf", f)
	}
	if err != nil {
		return err
	}
	bin := filepath.Join(cfg.BinDir, PluginType)
	if err := os.Remove(bin); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", bin, err)
	}
	return nil
}

// Watch runs Install every PollInterval until ctx ends, so an entry lost
// when the primary CNI rewrites its configuration (or a new primary
// appears) is chained again. Failures are logged and retried; Watch
// returns nil when ctx ends, or once Config.Marker exists: an uninstall
// ran (the preStop hook), and Watch undoes an install that raced it
// (Uninstall again) and chains nothing more.
func Watch(ctx context.Context, cfg Config) error {
	every := cfg.PollInterval
	if every <= 0 {
		every = DefaultPollInterval
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	var lastErr string
	for {
		if cfg.uninstalled() {
			return cfg.afterUninstall()
		}
		err := Install(cfg)
		if cfg.uninstalled() { // the uninstall ran while this one installed
			return cfg.afterUninstall()
		}
		switch {
		case err == nil:
			lastErr = ""
		case err.Error() != lastErr: // log each distinct failure once
			lastErr = err.Error()
			cfg.logger().Warn("install ambpf-cni", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// uninstalled reports whether Uninstall marked the node's entry removed.
func (c *Config) uninstalled() bool {
	if c.Marker == "" {
		return false
	}
	_, err := os.Stat(c.Marker)
	return err == nil
}

// afterUninstall is Watch's end once the uninstall ran: whatever an
// install that raced it put back is removed again.
func (c *Config) afterUninstall() error {
	c.logger().Info("ambpf-cni was uninstalled (preStop): no longer chaining it", "marker", c.Marker)
	if err := Uninstall(*c); err != nil {
		return fmt.Errorf("undo an install that raced the uninstall: %w", err)
	}
	return nil
}

// InstallBinary copies src into dir as PluginType through a temp file and
// a rename, so a runtime executing the old binary meanwhile is unaffected
// and never sees a partial file.
func InstallBinary(src, dir string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("open plugin binary: %w", err)
	}
	defer in.Close()
	dst := filepath.Join(dir, PluginType)
	tmp, err := os.CreateTemp(dir, "."+PluginType+".tmp-*")
	if err != nil {
		return fmt.Errorf("install %s: %w", dst, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	_, err = io.Copy(tmp, in)
	if err == nil {
		err = tmp.Chmod(0o755)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), dst)
	}
	if err != nil {
		return fmt.Errorf("install %s: %w", dst, err)
	}
	return nil
}

// DaemonSetGone reports whether the DaemonSet namespace/name no longer
// exists or is being deleted: the test the agent pod's preStop hook makes
// to tell an uninstall (helm deletes the DaemonSet, then the garbage
// collector its pods) from a rollout or a drain, where the entry must
// stay so new pods keep waiting for the agent instead of starting
// uncaptured.
func DaemonSetGone(ctx context.Context, client kubernetes.Interface, namespace, name string) (bool, error) {
	ds, err := client.AppsV1().DaemonSets(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("get daemonset %s/%s: %w", namespace, name, err)
	}
	return ds.DeletionTimestamp != nil, nil
}
