package ociimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestReproducible: two builds of the same files give byte-identical
// tarballs, every entry is stamped with the fixed time, and the index
// names the image under the annotations containerd and OCI tools read.
func TestReproducible(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "app")
	if err := os.WriteFile(bin, []byte("#!/bin/true\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	spec := Spec{
		Ref:        "localhost/test:1",
		Created:    time.Unix(1234, 0).UTC(),
		Env:        []string{"PATH=/bin"},
		Entrypoint: []string{"/bin/app"},
		Files:      []File{{Src: bin, Dst: "/bin/app"}},
	}
	var sums [2][32]byte
	var digests [2]string
	for i := range sums {
		out := filepath.Join(dir, "img.tar")
		d, err := WriteTarball(out, spec)
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		sums[i], digests[i] = sha256.Sum256(data), d
		if i == 0 {
			checkTarball(t, data, spec)
		}
		// A later build must not depend on the clock.
		time.Sleep(1100 * time.Millisecond)
	}
	if sums[0] != sums[1] || digests[0] != digests[1] {
		t.Fatalf("two builds differ: %x (%s) vs %x (%s)", sums[0], digests[0], sums[1], digests[1])
	}
}

func checkTarball(t *testing.T, data []byte, spec Spec) {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(data))
	var index []byte
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if !h.ModTime.Equal(spec.Created) {
			t.Errorf("%s stamped %v, want %v", h.Name, h.ModTime, spec.Created)
		}
		if h.Name == "index.json" {
			if index, err = io.ReadAll(tr); err != nil {
				t.Fatal(err)
			}
		}
	}
	var idx struct {
		Manifests []struct {
			Annotations map[string]string `json:"annotations"`
		} `json:"manifests"`
	}
	if err := json.Unmarshal(index, &idx); err != nil {
		t.Fatalf("index.json: %v", err)
	}
	if len(idx.Manifests) != 1 {
		t.Fatalf("index has %d manifests", len(idx.Manifests))
	}
	for _, k := range []string{"io.containerd.image.name", "org.opencontainers.image.ref.name"} {
		if got := idx.Manifests[0].Annotations[k]; got != spec.Ref {
			t.Errorf("annotation %s = %q, want %q", k, got, spec.Ref)
		}
	}
}
