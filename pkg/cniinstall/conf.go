// Package cniinstall puts the ambpf-cni plugin on a node: it copies the
// binary into the CNI bin dir and chains an {"type":"ambpf-cni"} entry as
// the last plugin of the primary network configuration, and undoes both.
//
// The primary configuration is the one the container runtime uses: the
// lexicographically first *.conf, *.conflist or *.json file of the conf
// dir (libcni's order). A single-plugin *.conf is converted to a conflist
// as libcni does (the plugin becomes the list's only entry; name and
// cniVersion move up) and written as <base>.conflist, the .conf removed.
// Files are rewritten atomically (temp file + rename in the same dir) so
// the runtime never reads half a file.
package cniinstall

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
)

// PluginType is the "type" of the chained entry and the binary's name.
const PluginType = "ambpf-cni"

// ErrNoPrimary reports a conf dir without any network configuration yet
// (the primary CNI has not written one).
var ErrNoPrimary = errors.New("no CNI network configuration")

// confExts are the extensions libcni loads, in no particular order.
var confExts = []string{".conf", ".conflist", ".json"}

// PrimaryConfig returns the path of the configuration the runtime uses:
// the lexicographically first file with a CNI extension in dir.
func PrimaryConfig(dir string) (string, error) {
	files, err := confFiles(dir)
	if err != nil {
		return "", err
	}
	if len(files) == 0 {
		return "", fmt.Errorf("%s: %w", dir, ErrNoPrimary)
	}
	return files[0], nil
}

func confFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read CNI conf dir: %w", err)
	}
	var files []string
	for _, e := range entries {
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		for _, ext := range confExts {
			if filepath.Ext(e.Name()) == ext {
				files = append(files, filepath.Join(dir, e.Name()))
			}
		}
	}
	sort.Strings(files)
	return files, nil
}

// conflist is a decoded configuration: generic JSON so every field the
// primary CNI wrote survives a rewrite (numbers kept exact).
type conflist map[string]any

func decode(data []byte) (conflist, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var c conflist
	if err := dec.Decode(&c); err != nil {
		return nil, err
	}
	if c == nil {
		return nil, errors.New("not a JSON object")
	}
	return c, nil
}

// asList returns the configuration as a conflist; converted reports that
// it was a single-plugin conf.
func (c conflist) asList() (list conflist, converted bool, err error) {
	if _, ok := c["plugins"]; ok {
		if _, ok := c["plugins"].([]any); !ok {
			return nil, false, errors.New(`"plugins" is not a list`)
		}
		return c, false, nil
	}
	if _, ok := c["type"].(string); !ok {
		return nil, false, errors.New(`neither "plugins" nor "type"`)
	}
	list = conflist{"name": c["name"], "plugins": []any{map[string]any(c)}}
	if v, ok := c["cniVersion"]; ok {
		list["cniVersion"] = v
	}
	return list, true, nil
}

func (c conflist) plugins() []any { return c["plugins"].([]any) }

// isOurs reports whether a plugin entry is the chained ambpf entry.
func isOurs(p any) bool {
	m, ok := p.(map[string]any)
	return ok && m["type"] == PluginType
}

// chain returns c with entry as its last plugin and any other ambpf entry
// removed; changed is false when c already ended with an equal entry and
// had no other.
func (c conflist) chain(entry map[string]any) (changed bool) {
	ps := c.plugins()
	var kept []any
	for _, p := range ps {
		if !isOurs(p) {
			kept = append(kept, p)
		}
	}
	if len(kept) == len(ps)-1 && reflect.DeepEqual(normalize(ps[len(ps)-1]), normalize(entry)) {
		return false
	}
	c["plugins"] = append(kept, any(entry))
	return true
}

// unchain removes every ambpf entry; changed reports whether there was one.
func (c conflist) unchain() (changed bool) {
	ps := c.plugins()
	kept := make([]any, 0, len(ps))
	for _, p := range ps {
		if !isOurs(p) {
			kept = append(kept, p)
		}
	}
	c["plugins"] = kept
	return len(kept) != len(ps)
}

// normalize round-trips v through JSON so values built in Go (bool,
// string) compare equal to decoded ones (json.Number, ...).
func normalize(v any) any {
	b, err := json.Marshal(v)
	if err != nil {
		return v
	}
	out, err := decode(b)
	if err != nil {
		return v
	}
	return map[string]any(out)
}

// writeAtomic writes data to path through a hidden temp file in the same
// directory (ignored by libcni) and a rename.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(mode)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func encode(c conflist) []byte {
	b, _ := json.MarshalIndent(c, "", "  ") // maps of JSON values always marshal
	return append(b, '\n')
}

// Chain makes entry (which must have "type": PluginType) the last plugin of
// the primary configuration in dir, converting a single-plugin .conf to a
// .conflist. It returns the path written (or already chained) and whether
// anything changed; a second call with the same entry changes nothing.
func Chain(dir string, entry map[string]any) (path string, changed bool, err error) {
	if entry["type"] != PluginType {
		return "", false, fmt.Errorf("chained entry type %v, want %q", entry["type"], PluginType)
	}
	path, err = PrimaryConfig(dir)
	if err != nil {
		return "", false, err
	}
	data, mode, err := readConf(path)
	if err != nil {
		return path, false, err
	}
	c, err := decode(data)
	if err != nil {
		return path, false, fmt.Errorf("parse %s: %w", path, err)
	}
	list, converted, err := c.asList()
	if err != nil {
		return path, false, fmt.Errorf("parse %s: %w", path, err)
	}
	if !list.chain(entry) && !converted {
		return path, false, nil
	}
	out := path
	if converted {
		out = strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
	}
	if err := writeAtomic(out, encode(list), mode); err != nil {
		return path, false, err
	}
	if converted && out != path {
		if err := os.Remove(path); err != nil {
			return out, true, fmt.Errorf("remove converted %s: %w", path, err)
		}
	}
	return out, true, nil
}

// Unchain removes the ambpf entry from every configuration in dir (a file
// chained while it was primary may no longer be), leaving each file's other
// content JSON-equal to what it was. It returns the files it rewrote.
func Unchain(dir string) ([]string, error) {
	files, err := confFiles(dir)
	if err != nil {
		return nil, err
	}
	var changed []string
	var errs []error
	for _, path := range files {
		data, mode, err := readConf(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		c, err := decode(data)
		if err != nil {
			continue // not ours to judge: leave unparsable files alone
		}
		if _, ok := c["plugins"].([]any); !ok || !c.unchain() {
			continue
		}
		if err := writeAtomic(path, encode(c), mode); err != nil {
			errs = append(errs, err)
			continue
		}
		changed = append(changed, path)
	}
	return changed, errors.Join(errs...)
}

func readConf(path string) ([]byte, os.FileMode, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, 0, fmt.Errorf("stat %s: %w", path, err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, fmt.Errorf("read %s: %w", path, err)
	}
	return data, st.Mode().Perm(), nil
}
