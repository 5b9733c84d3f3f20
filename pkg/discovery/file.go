package discovery

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/ambpf/ambpf/pkg/authz"
)

// DefaultPollInterval is how often File.Run checks the file for changes.
const DefaultPollInterval = time.Second

// Parse reads a discovery file (format in the package doc) into a
// Snapshot. Errors name the line they happened on when it can be found.
func Parse(data []byte) (Snapshot, error) {
	var snap Snapshot
	var peerAuths []peerAuthentication
	for _, d := range splitDocuments(data) {
		var head struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal(d.text, &head); err != nil {
			return Snapshot{}, d.wrap(err)
		}
		switch head.Kind {
		case "":
			var part Snapshot
			if err := yaml.UnmarshalStrict(d.text, &part); err != nil {
				return Snapshot{}, d.wrap(err)
			}
			// Validate policies here, where the line is still known.
			for i := range part.Policies {
				if err := part.Policies[i].Validate(); err != nil {
					return Snapshot{}, d.wrap(fmt.Errorf("policy %s: %w", part.Policies[i].ID(), err))
				}
			}
			snap.merge(part)
		case "AuthorizationPolicy":
			var p authz.Policy
			if err := yaml.UnmarshalStrict(d.text, &p); err != nil {
				return Snapshot{}, d.wrap(err)
			}
			if err := p.Validate(); err != nil {
				return Snapshot{}, d.wrap(fmt.Errorf("policy %s: %w", p.ID(), err))
			}
			snap.Policies = append(snap.Policies, p)
		case "PeerAuthentication":
			var pa peerAuthentication
			if err := yaml.UnmarshalStrict(d.text, &pa); err != nil {
				return Snapshot{}, d.wrap(err)
			}
			if err := pa.check(); err != nil {
				return Snapshot{}, d.wrap(err)
			}
			peerAuths = append(peerAuths, pa)
		default:
			return Snapshot{}, d.wrap(fmt.Errorf("unsupported kind %q", head.Kind))
		}
	}
	// PeerAuthentications last: which namespace is the root may be set in
	// any document.
	root := snap.RootNamespace
	if root == "" {
		root = authz.DefaultRootNamespace
	}
	for _, pa := range peerAuths {
		mode := MTLSMode(pa.Spec.MTLS.Mode)
		if mode == "" || mode == "UNSET" {
			continue
		}
		if pa.Metadata.Namespace == root {
			snap.MTLS.Mode = mode
			continue
		}
		if snap.MTLS.Namespaces == nil {
			snap.MTLS.Namespaces = map[string]MTLSMode{}
		}
		snap.MTLS.Namespaces[pa.Metadata.Namespace] = mode
	}
	if err := snap.validate(); err != nil {
		return Snapshot{}, err
	}
	return snap, nil
}

// merge appends the lists of part and takes its scalars when set.
func (s *Snapshot) merge(part Snapshot) {
	s.TrustDomain = override(s.TrustDomain, part.TrustDomain)
	s.RootNamespace = override(s.RootNamespace, part.RootNamespace)
	s.MTLS.Mode = override(s.MTLS.Mode, part.MTLS.Mode)
	for ns, m := range part.MTLS.Namespaces {
		if s.MTLS.Namespaces == nil {
			s.MTLS.Namespaces = map[string]MTLSMode{}
		}
		s.MTLS.Namespaces[ns] = m
	}
	s.Workloads = append(s.Workloads, part.Workloads...)
	s.Services = append(s.Services, part.Services...)
	s.Policies = append(s.Policies, part.Policies...)
}

// peerAuthentication is the namespace-wide form of Istio's
// security.istio.io/v1 PeerAuthentication.
type peerAuthentication struct {
	APIVersion string           `json:"apiVersion,omitempty"`
	Kind       string           `json:"kind"`
	Metadata   authz.ObjectMeta `json:"metadata"`
	Spec       struct {
		Selector *authz.Selector `json:"selector,omitempty"`
		MTLS     struct {
			Mode string `json:"mode,omitempty"`
		} `json:"mtls"`
		PortLevelMTLS map[string]any `json:"portLevelMtls,omitempty"`
	} `json:"spec"`
}

func (pa *peerAuthentication) check() error {
	id := pa.Metadata.Namespace + "/" + pa.Metadata.Name
	if pa.Metadata.Namespace == "" {
		return fmt.Errorf("PeerAuthentication %q: metadata.namespace is required", pa.Metadata.Name)
	}
	if pa.Spec.Selector != nil || len(pa.Spec.PortLevelMTLS) > 0 {
		return fmt.Errorf("PeerAuthentication %s: selector and portLevelMtls are not supported, only namespace-wide modes", id)
	}
	if m := MTLSMode(pa.Spec.MTLS.Mode); m != "UNSET" {
		if err := validMode(m); err != nil {
			return fmt.Errorf("PeerAuthentication %s: spec.mtls.mode: %w", id, err)
		}
	}
	return nil
}

// document is one YAML document of a file and where it starts.
type document struct {
	text  []byte
	start int // 1-based line of the document's first line
}

// splitDocuments cuts data at "---" separator lines, dropping documents
// that hold only comments and blank lines.
func splitDocuments(data []byte) []document {
	var docs []document
	lines := bytes.SplitAfter(data, []byte("\n"))
	cur := document{start: 1}
	empty := true
	flush := func(next int) {
		if !empty {
			docs = append(docs, cur)
		}
		cur, empty = document{start: next}, true
	}
	for i, line := range lines {
		trimmed := bytes.TrimRight(line, " \t\r\n")
		if bytes.Equal(trimmed, []byte("---")) || bytes.HasPrefix(trimmed, []byte("--- ")) {
			flush(i + 2)
			continue
		}
		cur.text = append(cur.text, line...)
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			empty = false
		}
	}
	flush(0)
	return docs
}

var (
	yamlLine   = regexp.MustCompile(`yaml: line (\d+): `)
	quoted     = regexp.MustCompile(`"((?:[^"\\]|\\.)+)"`)
	structPath = regexp.MustCompile(`Go struct field \S*\.(\w+) of type`)
)

// wrap prefixes err with the absolute line it refers to: the YAML parser
// reports lines within the document; JSON decoding errors carry no line,
// so the first line holding the offending field name or value is used.
func (d document) wrap(err error) error {
	msg := err.Error()
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		n, _ := strconv.Atoi(m[1])
		return fmt.Errorf("line %d: %s", d.start+n-1, yamlLine.ReplaceAllString(msg, "yaml: "))
	}
	var needles []string
	if m := structPath.FindStringSubmatch(msg); m != nil {
		needles = append(needles, m[1]+":")
	}
	for _, m := range quoted.FindAllStringSubmatch(msg, -1) {
		s, uerr := strconv.Unquote(`"` + m[1] + `"`)
		if uerr != nil {
			s = m[1]
		}
		if strings.Contains(msg, "unknown field") {
			s += ":"
		}
		needles = append(needles, s)
	}
	lines := strings.Split(string(d.text), "\n")
	for _, needle := range needles {
		for i, l := range lines {
			if strings.Contains(l, needle) {
				return fmt.Errorf("line %d: %w", d.start+i, err)
			}
		}
	}
	return fmt.Errorf("document starting at line %d: %w", d.start, err)
}

// File keeps a Layer equal to the content of a discovery file, reloading
// it when the file changes. A file that cannot be read or parsed leaves
// the layer as it was (the last good state) and is reported by Err and
// logged.
type File struct {
	path     string
	layer    *Layer
	interval time.Duration
	log      *slog.Logger

	mu      sync.Mutex
	stamp   fileStamp
	sum     [sha256.Size]byte
	loaded  bool
	lastErr error
}

// fileStamp is what a stat tells about a change. The inode catches
// atomic renames and Kubernetes ConfigMap symlink swaps (Stat follows
// symlinks); mtime and size catch writes in place.
type fileStamp struct {
	dev, ino uint64
	mtime    time.Time
	size     int64
}

// FileOptions tune a File; the zero value is usable.
type FileOptions struct {
	// PollInterval is how often Run stats the file; 0 means
	// DefaultPollInterval. Polling (rather than inotify) survives the
	// file being replaced by rename or a symlink swap without re-arming
	// watches, and a second's delay is fine for configuration.
	PollInterval time.Duration
	// Logger receives reload results; nil means slog.Default().
	Logger *slog.Logger
}

// NewFile returns a File that loads path into layer. It does not read the
// file: call Load (at start, to fail fast) and Run.
func NewFile(path string, layer *Layer, opts FileOptions) *File {
	if opts.PollInterval <= 0 {
		opts.PollInterval = DefaultPollInterval
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &File{path: path, layer: layer, interval: opts.PollInterval,
		log: opts.Logger.With("file", path)}
}

// Load reads and parses the file now and, when it parsed and differs from
// what was last loaded, replaces the layer's content (which notifies the
// store's subscribers). On error the layer keeps its content; the error is
// returned, logged and kept for Err.
func (f *File) Load() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.load()
}

func (f *File) load() error {
	err := f.reload()
	if err != nil {
		if f.lastErr == nil || f.lastErr.Error() != err.Error() {
			f.log.Error("discovery file rejected; keeping the last good state", "error", err)
		}
	} else if f.lastErr != nil {
		f.log.Info("discovery file accepted again")
	}
	f.lastErr = err
	return err
}

func (f *File) reload() error {
	st, err := stat(f.path)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(f.path)
	if err != nil {
		return fmt.Errorf("read discovery file: %w", err)
	}
	f.stamp = st
	sum := sha256.Sum256(data)
	if f.loaded && sum == f.sum {
		return nil
	}
	snap, err := Parse(data)
	if err != nil {
		return fmt.Errorf("parse %s: %w", f.path, err)
	}
	f.sum, f.loaded = sum, true
	for i := range snap.Policies {
		if l7 := snap.Policies[i].L7Fields(); len(l7) > 0 {
			f.log.Warn(authz.HTTPAttributesWarning,
				"policy", snap.Policies[i].ID(), "fields", l7)
		}
	}
	f.layer.Set(snap)
	f.log.Info("discovery file loaded", "workloads", len(snap.Workloads),
		"services", len(snap.Services), "policies", len(snap.Policies))
	return nil
}

func stat(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, fmt.Errorf("stat discovery file: %w", err)
	}
	st := fileStamp{mtime: fi.ModTime(), size: fi.Size()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.dev, st.ino = uint64(sys.Dev), sys.Ino
	}
	return st, nil
}

// Err returns the error of the last load, nil if it succeeded.
func (f *File) Err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lastErr
}

// Run checks the file every poll interval and loads it once its inode,
// size or modification time changed and then stayed the same for one
// more interval (so a file being written in place is not read half
// written), or when the last load failed (so a transient error heals).
// It returns ctx's error when ctx is done.
func (f *File) Run(ctx context.Context) error {
	t := time.NewTicker(f.interval)
	defer t.Stop()
	var pending fileStamp
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		f.mu.Lock()
		st, err := stat(f.path)
		switch {
		case err != nil || f.lastErr != nil:
			// A missing file is reported through load like any other
			// failure; the layer keeps its content.
			_ = f.load()
		case st != f.stamp && st == pending:
			_ = f.load()
		default:
			pending = st
		}
		f.mu.Unlock()
	}
}
