// Image module: builds the chart's image, the e2e test app image and a
// pause image as OCI image tarballs, without Docker, with
// go-containerregistry. Kept apart from the ambpf module so its
// dependencies never enter ambpf's go.mod; `make image` and hack/node use it.
module github.com/ambpf/ambpf/hack/image

go 1.26.0

require github.com/google/go-containerregistry v0.22.1

require (
	github.com/klauspost/compress v1.19.2 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/opencontainers/image-spec v1.1.1 // indirect
)
