// Package ociimage builds single-layer images from local files with
// go-containerregistry and writes them as OCI image-layout tarballs.
package ociimage

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// File is one local file (Src) placed at the absolute path Dst, mode 0755.
type File struct {
	Src, Dst string
}

// Spec describes an image.
type Spec struct {
	// Ref is the name:tag recorded in the layout's index, under the
	// annotations containerd and OCI tools read on import.
	Ref        string
	Created    time.Time
	Env        []string
	Entrypoint []string
	Files      []File
}

// Build returns the image for s: empty base, one layer holding s.Files
// (and their parent directories), config with s.Env and s.Entrypoint, OCI
// media types, every time stamp s.Created.
func Build(s Spec) (v1.Image, error) {
	layerTar, err := layerTar(s.Files, s.Created)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{Layer: layer, MediaType: types.OCILayer})
	if err != nil {
		return nil, fmt.Errorf("append layer: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	cfg.Created = v1.Time{Time: s.Created}
	cfg.Config.Env = s.Env
	cfg.Config.Entrypoint = s.Entrypoint
	// mutate.Append stamps history with the current time; one fixed entry
	// keeps the config (and so the digest) reproducible.
	cfg.History = []v1.History{{Created: v1.Time{Time: s.Created}, CreatedBy: "ambpf hack/image mkimage"}}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return nil, fmt.Errorf("set config: %w", err)
	}
	return mutate.CreatedAt(img, v1.Time{Time: s.Created})
}

// layerTar returns an uncompressed tar of files with their parent
// directories, sorted, root-owned, all stamped ts.
func layerTar(files []File, ts time.Time) ([]byte, error) {
	dirs := map[string]bool{}
	byDst := map[string]string{}
	for _, f := range files {
		dst := path.Clean("/" + f.Dst)
		if _, dup := byDst[dst]; dup {
			return nil, fmt.Errorf("%s given twice", dst)
		}
		byDst[dst] = f.Src
		for d := path.Dir(dst); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	names := make([]string, 0, len(dirs)+len(byDst))
	for d := range dirs {
		names = append(names, d)
	}
	for f := range byDst {
		names = append(names, f)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		hdr := &tar.Header{Name: strings.TrimPrefix(n, "/"), ModTime: ts, Uid: 0, Gid: 0, Format: tar.FormatPAX}
		if dirs[n] {
			hdr.Typeflag, hdr.Name, hdr.Mode = tar.TypeDir, hdr.Name+"/", 0o755
			if err := tw.WriteHeader(hdr); err != nil {
				return nil, fmt.Errorf("tar %s: %w", n, err)
			}
			continue
		}
		data, err := os.ReadFile(byDst[n])
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", byDst[n], err)
		}
		hdr.Typeflag, hdr.Mode, hdr.Size = tar.TypeReg, 0o755, int64(len(data))
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("tar %s: %w", n, err)
		}
		if _, err := tw.Write(data); err != nil {
			return nil, fmt.Errorf("tar %s: %w", n, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close tar: %w", err)
	}
	return buf.Bytes(), nil
}

// WriteTarball builds s and writes it to out as an OCI image layout in a
// tar (oci-layout, index.json, blobs/sha256/...), entries stamped s.Created.
// It returns the manifest digest.
func WriteTarball(out string, s Spec) (string, error) {
	img, err := Build(s)
	if err != nil {
		return "", err
	}
	manifest, err := img.RawManifest()
	if err != nil {
		return "", fmt.Errorf("manifest: %w", err)
	}
	digest, err := img.Digest()
	if err != nil {
		return "", fmt.Errorf("digest: %w", err)
	}
	cfgName, err := img.ConfigName()
	if err != nil {
		return "", fmt.Errorf("config digest: %w", err)
	}
	cfg, err := img.RawConfigFile()
	if err != nil {
		return "", fmt.Errorf("config: %w", err)
	}
	type blob struct {
		digest v1.Hash
		read   func() (io.ReadCloser, error)
	}
	blobs := []blob{
		{digest, func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(manifest)), nil }},
		{cfgName, func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(cfg)), nil }},
	}
	layers, err := img.Layers()
	if err != nil {
		return "", fmt.Errorf("layers: %w", err)
	}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return "", fmt.Errorf("layer digest: %w", err)
		}
		blobs = append(blobs, blob{d, l.Compressed})
	}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     types.OCIImageIndex,
		"manifests": []map[string]any{{
			"mediaType": types.OCIManifestSchema1,
			"digest":    digest.String(),
			"size":      len(manifest),
			"annotations": map[string]string{
				// containerd's importer names the image from the first;
				// OCI tools from the second.
				"io.containerd.image.name":          s.Ref,
				"org.opencontainers.image.ref.name": s.Ref,
			},
		}},
	})
	if err != nil {
		return "", fmt.Errorf("index: %w", err)
	}

	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return "", fmt.Errorf("create %s: %w", tmp, err)
	}
	defer os.Remove(tmp)
	defer f.Close()
	tw := tar.NewWriter(f)
	put := func(name string, size int64, r io.Reader, mode int64) error {
		hdr := &tar.Header{Name: name, Size: size, Mode: mode, ModTime: s.Created, Format: tar.FormatPAX}
		if size < 0 {
			hdr.Typeflag, hdr.Size = tar.TypeDir, 0
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("tar %s: %w", name, err)
		}
		if r != nil {
			if _, err := io.Copy(tw, r); err != nil {
				return fmt.Errorf("tar %s: %w", name, err)
			}
		}
		return nil
	}
	layout := []byte(`{"imageLayoutVersion":"1.0.0"}`)
	if err := put("oci-layout", int64(len(layout)), bytes.NewReader(layout), 0o644); err != nil {
		return "", err
	}
	if err := put("index.json", int64(len(index)), bytes.NewReader(index), 0o644); err != nil {
		return "", err
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := put(d, -1, nil, 0o755); err != nil {
			return "", err
		}
	}
	seen := map[v1.Hash]bool{}
	for _, b := range blobs {
		if seen[b.digest] {
			continue
		}
		seen[b.digest] = true
		rc, err := b.read()
		if err != nil {
			return "", fmt.Errorf("read blob %s: %w", b.digest, err)
		}
		data, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			return "", fmt.Errorf("read blob %s: %w", b.digest, err)
		}
		if err := put("blobs/sha256/"+b.digest.Hex, int64(len(data)), bytes.NewReader(data), 0o644); err != nil {
			return "", err
		}
	}
	if err := tw.Close(); err != nil {
		return "", fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", fmt.Errorf("rename %s: %w", tmp, err)
	}
	return digest.String(), nil
}
