package cniinstall

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"
)

const bridgeList = `{
  "cniVersion": "1.0.0",
  "name": "kindnet",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "mtu": 1500, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}`

const singleConf = `{"cniVersion":"0.4.0","name":"bridge-net","type":"bridge","bridge":"cni0","isGateway":true,"ipam":{"type":"host-local","subnet":"10.88.0.0/16"}}`

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func readJSON(t *testing.T, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	c, err := decode(b)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return c
}

func jsonOf(t *testing.T, s string) map[string]any {
	t.Helper()
	c, err := decode([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func pluginTypes(c map[string]any) []string {
	var out []string
	for _, p := range c["plugins"].([]any) {
		out = append(out, p.(map[string]any)["type"].(string))
	}
	return out
}

var entry = map[string]any{"type": PluginType, "agent_socket": "/var/run/ambpf/agent.sock"}

func TestChain(t *testing.T) {
	tests := []struct {
		name      string
		files     map[string]string
		entry     map[string]any
		wantFile  string   // the file that must hold the chain
		wantTypes []string // its plugin types after Chain
		gone      []string // files that must no longer exist
		untouched []string // files that must keep their exact bytes
	}{
		{
			name:      "conflist gets the entry last",
			files:     map[string]string{"10-kindnet.conflist": bridgeList},
			entry:     entry,
			wantFile:  "10-kindnet.conflist",
			wantTypes: []string{"ptp", "portmap", PluginType},
		},
		{
			name:      "single-plugin conf becomes a conflist",
			files:     map[string]string{"10-bridge.conf": singleConf},
			entry:     entry,
			wantFile:  "10-bridge.conflist",
			wantTypes: []string{"bridge", PluginType},
			gone:      []string{"10-bridge.conf"},
		},
		{
			name: "only the lexicographically first config is primary",
			files: map[string]string{
				"20-other.conflist":    bridgeList,
				"10-kindnet.conflist":  bridgeList,
				"05-old.conflist.bak":  singleConf,
				".00-hidden.conflist":  singleConf,
				"README":               "not a config",
				"30-extra.json":        singleConf,
				"99-loopback.conflist": bridgeList,
			},
			entry:     entry,
			wantFile:  "10-kindnet.conflist",
			wantTypes: []string{"ptp", "portmap", PluginType},
			untouched: []string{"20-other.conflist", "05-old.conflist.bak", ".00-hidden.conflist", "30-extra.json"},
		},
		{
			name: "an entry in the middle moves last, duplicates go",
			files: map[string]string{"10-x.conflist": `{"cniVersion":"1.0.0","name":"x","plugins":[
				{"type":"ptp"},{"type":"ambpf-cni","old":true},{"type":"portmap"},{"type":"ambpf-cni"}]}`},
			entry:     entry,
			wantFile:  "10-x.conflist",
			wantTypes: []string{"ptp", "portmap", PluginType},
		},
		{
			name:      "a changed entry is rewritten",
			files:     map[string]string{"10-x.conflist": `{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"ptp"},{"type":"ambpf-cni","dns_capture":false}]}`},
			entry:     map[string]any{"type": PluginType, "dns_capture": true},
			wantFile:  "10-x.conflist",
			wantTypes: []string{"ptp", PluginType},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, tt.files)
			path, changed, err := Chain(dir, tt.entry)
			if err != nil {
				t.Fatalf("Chain: %v", err)
			}
			if !changed || path != filepath.Join(dir, tt.wantFile) {
				t.Fatalf("Chain = %s, changed %v; want %s, changed", path, changed, tt.wantFile)
			}
			got := readJSON(t, path)
			if types := pluginTypes(got); !reflect.DeepEqual(types, tt.wantTypes) {
				t.Errorf("plugin types = %v, want %v", types, tt.wantTypes)
			}
			ps := got["plugins"].([]any)
			if last := ps[len(ps)-1]; !reflect.DeepEqual(last, normalize(tt.entry)) {
				t.Errorf("last plugin = %v, want %v", last, tt.entry)
			}
			for _, g := range tt.gone {
				if _, err := os.Stat(filepath.Join(dir, g)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s still exists (%v)", g, err)
				}
			}
			for _, u := range tt.untouched {
				b, err := os.ReadFile(filepath.Join(dir, u))
				if err != nil || string(b) != tt.files[u] {
					t.Errorf("%s changed (%v)", u, err)
				}
			}
			// Idempotent: the same entry again writes nothing.
			before, _ := os.ReadFile(path)
			if p2, changed, err := Chain(dir, tt.entry); err != nil || changed || p2 != path {
				t.Errorf("second Chain = %s, changed %v, %v; want %s, unchanged", p2, changed, err, path)
			}
			if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
				t.Errorf("second Chain rewrote %s", path)
			}
		})
	}
}

func TestChainErrors(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string
		want  error // nil: any error
	}{
		{name: "empty dir", files: nil, want: ErrNoPrimary},
		{name: "invalid JSON", files: map[string]string{"10-x.conflist": `{"plugins": [`}},
		{name: "plugins not a list", files: map[string]string{"10-x.conflist": `{"plugins": {}}`}},
		{name: "conf without type", files: map[string]string{"10-x.conf": `{"name": "x"}`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, tt.files)
			_, _, err := Chain(dir, entry)
			if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) {
				t.Fatalf("Chain err = %v, want %v", err, tt.want)
			}
			for name, data := range tt.files {
				if b, _ := os.ReadFile(filepath.Join(dir, name)); string(b) != data {
					t.Errorf("failed Chain modified %s", name)
				}
			}
		})
	}
}

func testConfig(t *testing.T) Config {
	t.Helper()
	root := t.TempDir()
	cfg := Config{
		Binary:       filepath.Join(root, "image", PluginType),
		BinDir:       filepath.Join(root, "opt-cni-bin"),
		ConfDir:      filepath.Join(root, "etc-cni-net.d"),
		Plugin:       map[string]any{"agent_socket": "/var/run/ambpf/agent.sock", "dns_capture": true},
		PollInterval: 20 * time.Millisecond,
	}
	for _, d := range []string{filepath.Dir(cfg.Binary), cfg.BinDir, cfg.ConfDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(cfg.Binary, []byte("#!/bin/sh\necho plugin\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestInstallUninstall: the binary lands executable with the same bytes,
// the entry is chained; Uninstall leaves the conflist JSON-equal to the
// original and removes the binary; both are idempotent.
func TestInstallUninstall(t *testing.T) {
	cfg := testConfig(t)
	conf := filepath.Join(cfg.ConfDir, "10-kindnet.conflist")
	writeFiles(t, cfg.ConfDir, map[string]string{"10-kindnet.conflist": bridgeList})
	other := filepath.Join(cfg.ConfDir, "20-old.conflist")
	writeFiles(t, cfg.ConfDir, map[string]string{"20-old.conflist": `{"name":"old","plugins":[{"type":"bridge"},{"type":"ambpf-cni"}]}`})

	for range 2 {
		if err := Install(cfg); err != nil {
			t.Fatalf("Install: %v", err)
		}
	}
	bin := filepath.Join(cfg.BinDir, PluginType)
	st, err := os.Stat(bin)
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("installed binary: %v, mode %v", err, st)
	}
	want, _ := os.ReadFile(cfg.Binary)
	if got, _ := os.ReadFile(bin); !bytes.Equal(got, want) {
		t.Errorf("installed binary differs from the source")
	}
	if types := pluginTypes(readJSON(t, conf)); !reflect.DeepEqual(types, []string{"ptp", "portmap", PluginType}) {
		t.Errorf("after Install plugin types = %v", types)
	}

	for range 2 {
		if err := Uninstall(cfg); err != nil {
			t.Fatalf("Uninstall: %v", err)
		}
	}
	if _, err := os.Stat(bin); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("binary after Uninstall: %v", err)
	}
	if got := readJSON(t, conf); !reflect.DeepEqual(got, jsonOf(t, bridgeList)) {
		t.Errorf("conflist after Uninstall not JSON-equal to the original:\n%v", got)
	}
	// A stale entry in a no-longer-primary file is removed too.
	if types := pluginTypes(readJSON(t, other)); !reflect.DeepEqual(types, []string{"bridge"}) {
		t.Errorf("other conflist after Uninstall: %v", types)
	}
}

// TestWatchRechains plays a primary CNI that rewrites its conflist without
// the entry, then a new primary that sorts first: Watch chains both.
func TestWatchRechains(t *testing.T) {
	cfg := testConfig(t)
	writeFiles(t, cfg.ConfDir, map[string]string{"10-kindnet.conflist": bridgeList})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Watch(ctx, cfg) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch: %v", err)
		}
	})

	waitChained := func(name string) {
		t.Helper()
		path := filepath.Join(cfg.ConfDir, name)
		deadline := time.Now().Add(10 * time.Second)
		for {
			if b, err := os.ReadFile(path); err == nil {
				if c, err := decode(b); err == nil {
					if _, ok := c["plugins"].([]any); ok {
						if ts := pluginTypes(c); ts[len(ts)-1] == PluginType {
							return
						}
					}
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s not chained within 10s", name)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitChained("10-kindnet.conflist")
	writeFiles(t, cfg.ConfDir, map[string]string{"10-kindnet.conflist": bridgeList}) // primary CNI rewrites
	waitChained("10-kindnet.conflist")
	writeFiles(t, cfg.ConfDir, map[string]string{"05-calico.conf": singleConf}) // a new primary
	waitChained("05-calico.conflist")
}

func TestEntryJSON(t *testing.T) {
	cfg := Config{Plugin: map[string]any{"agent_socket": "/s", "type": "wrong"}}
	b, err := json.Marshal(cfg.Entry())
	if err != nil || string(b) != `{"agent_socket":"/s","type":"ambpf-cni"}` {
		t.Errorf("Entry = %s, %v", b, err)
	}
}

// TestUninstallStopsWatch: an uninstall (the watching container's preStop
// hook) leaves the marker, and Watch stops: it chains the entry no more,
// and an install that raced the uninstall (chained again after the
// unchain) is undone. Without the marker a poll between the preStop and
// SIGTERM chained the entry again, leaving a plugin with no agent behind.
func TestUninstallStopsWatch(t *testing.T) {
	cfg := testConfig(t)
	cfg.Marker = filepath.Join(t.TempDir(), "uninstalled")
	conf := filepath.Join(cfg.ConfDir, "10-kindnet.conflist")
	bin := filepath.Join(cfg.BinDir, PluginType)
	writeFiles(t, cfg.ConfDir, map[string]string{"10-kindnet.conflist": bridgeList})
	chained := func() bool {
		b, err := os.ReadFile(conf)
		c, derr := decode(b)
		return err == nil && derr == nil && slices.Contains(pluginTypes(c), PluginType)
	}
	watch := func() <-chan error {
		done := make(chan error, 1)
		go func() { done <- Watch(context.Background(), cfg) }()
		return done
	}
	stopped := func(done <-chan error) {
		t.Helper()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Watch: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Watch went on after the uninstall")
		}
		if chained() {
			t.Error("the entry is chained after the uninstall")
		}
		if _, err := os.Stat(bin); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("binary after the uninstall: %v", err)
		}
	}

	done := watch()
	deadline := time.Now().Add(10 * time.Second)
	for !chained() {
		if time.Now().After(deadline) {
			t.Fatal("Watch did not chain the entry within 10 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := Uninstall(cfg); err != nil {
		t.Fatal(err)
	}
	stopped(done)

	// The race: an install lands after the uninstall's unchain.
	if err := Install(cfg); err != nil {
		t.Fatal(err)
	}
	stopped(watch())
}
