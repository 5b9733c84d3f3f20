//go:build linux

package nodelab

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"sigs.k8s.io/yaml"
)

// discoveryLoaded is the message pkg/discovery logs when the proxy took
// a new version of the file.
const discoveryLoaded = "discovery file loaded"

// WriteDiscovery writes the shared discovery file: a first document
// listing every mesh pod of every node as a workload (name, namespace,
// UID, IP, node, protocol HBONE), which is how each proxy learns the pods
// it does not serve, followed by extra (more YAML documents: policies,
// PeerAuthentications, services; may be empty). It swaps the file in by
// rename, as a ConfigMap update does, and then waits until every running
// proxy has loaded it (its "discovery file loaded" log line): one
// discovery update, after which traffic follows the new content.
func (c *Cluster) WriteDiscovery(extra string) error {
	type workload struct {
		Name      string   `json:"name"`
		Namespace string   `json:"namespace"`
		UID       string   `json:"uid"`
		IPs       []string `json:"ips"`
		Node      string   `json:"node"`
		Protocol  string   `json:"protocol"`
	}
	var ws []workload
	for _, p := range c.Pods() {
		if p.Mesh {
			ws = append(ws, workload{p.Name, p.Namespace, p.UID, []string{p.IP.String()}, p.Node.Name, "HBONE"})
		}
	}
	doc := map[string]any{"workloads": ws}
	b, err := yaml.Marshal(doc)
	if err != nil {
		return fmt.Errorf("discovery file: %w", err)
	}
	c.mu.Lock()
	c.discoveryGen++
	gen := c.discoveryGen
	c.mu.Unlock()
	// The generation makes every write a new version: the proxy skips a
	// file whose content it already has, and would log nothing.
	content := fmt.Sprintf("# nodelab %s, version %d\n%s", c.ID, gen, b)
	if strings.TrimSpace(extra) != "" {
		content += "---\n" + extra
	}
	offsets := map[*Node]int64{}
	for _, n := range c.Nodes {
		if n.Proxy != nil && !n.Proxy.Exited() {
			offsets[n] = fileSize(n.Proxy.LogPath())
		}
	}
	tmp := c.DiscoveryFile + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return fmt.Errorf("write discovery file: %w", err)
	}
	if err := os.Rename(tmp, c.DiscoveryFile); err != nil {
		return fmt.Errorf("write discovery file: %w", err)
	}
	for n, off := range offsets {
		err := waitUntil(StartWait, func() (bool, error) {
			return len(LogLines(n.Proxy.LogPath(), off, discoveryLoaded)) > 0, nil
		})
		if err != nil {
			return fmt.Errorf("%s proxy did not load discovery version %d: %w\n%s", n.Name, gen, err, n.Proxy.Tail(5))
		}
	}
	return nil
}

// LogLines returns the JSON log lines of the file at path, from byte
// offset from on, whose msg is msg.
func LogLines(path string, from int64, msg string) []map[string]any {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	if _, err := f.Seek(from, io.SeekStart); err != nil {
		return nil
	}
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}
