// Command mkimage writes a single-layer OCI image, built from files on the
// local disk, as an OCI image-layout tarball that `ctr images import` (and
// any OCI tool) reads. No Docker, no registry, no base image: the project's
// binaries are static, so the image is just them.
//
// The output is reproducible: every tar entry and the image config carry
// the same fixed time (--epoch, default $SOURCE_DATE_EPOCH or 0), entries
// are sorted, owners are root, and the gzip stream has no timestamp, so the
// same binaries give the same image digest.
//
//	mkimage --ref ghcr.io/ambpf/ambpf:dev --out ambpf.tar \
//	    --file bin/ambpf-agent=/opt/ambpf/bin/ambpf-agent \
//	    --env PATH=/opt/ambpf/bin:/usr/bin:/bin
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/ambpf/ambpf/hack/image/ociimage"
)

// listFlag collects a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	if err := run(os.Args[1:]); err != nil {
		slog.Error("mkimage failed", "err", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("mkimage", flag.ContinueOnError)
	var files, env, entrypoint listFlag
	ref := fs.String("ref", "", "image reference recorded in the tarball (name:tag)")
	out := fs.String("out", "", "output tarball path")
	epoch := fs.String("epoch", os.Getenv("SOURCE_DATE_EPOCH"), "Unix time stamped on every file and the config (default $SOURCE_DATE_EPOCH, else 0)")
	fs.Var(&files, "file", "SRC=DST: put local file SRC at DST in the image, mode 0755 (repeatable)")
	fs.Var(&env, "env", "KEY=VALUE in the image config (repeatable)")
	fs.Var(&entrypoint, "entrypoint", "entrypoint argument (repeatable, in order)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *ref == "" || *out == "" || len(files) == 0 {
		return fmt.Errorf("--ref, --out and at least one --file are required")
	}
	var ts int64
	if *epoch != "" {
		v, err := strconv.ParseInt(*epoch, 10, 64)
		if err != nil {
			return fmt.Errorf("parse --epoch %q: %w", *epoch, err)
		}
		ts = v
	}
	spec := ociimage.Spec{
		Ref:        *ref,
		Created:    time.Unix(ts, 0).UTC(),
		Env:        env,
		Entrypoint: entrypoint,
	}
	for _, f := range files {
		src, dst, ok := strings.Cut(f, "=")
		if !ok || src == "" || dst == "" {
			return fmt.Errorf("--file %q: want SRC=DST", f)
		}
		spec.Files = append(spec.Files, ociimage.File{Src: src, Dst: dst})
	}
	digest, err := ociimage.WriteTarball(*out, spec)
	if err != nil {
		return err
	}
	fmt.Printf("%s %s %s\n", *out, *ref, digest)
	return nil
}
