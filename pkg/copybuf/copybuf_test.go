package copybuf

import (
	"bytes"
	"crypto/rand"
	"io"
	"testing"
)

// chunks is a reader returning its data in reads of the given sizes.
type chunks struct {
	data  []byte
	sizes []int
}

func (c *chunks) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), len(c.data))
	if len(c.sizes) > 0 {
		n = min(n, c.sizes[0])
		c.sizes = c.sizes[1:]
	}
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

func TestCopyDeliversAndCounts(t *testing.T) {
	data := make([]byte, 3<<20)
	rand.Read(data)
	var dst bytes.Buffer
	counted := 0
	// Small reads first, then bulk: the buffer grows and nothing is lost.
	src := &chunks{data: data, sizes: []int{64, 64, 1000, Small, Small, Large}}
	n, bulk, err := Copy(&dst, src, func(k int) { counted += k }, false)
	if err != nil || bulk || n != int64(len(data)) || counted != len(data) || !bytes.Equal(dst.Bytes(), data) {
		t.Fatalf("n %d bulk %v err %v counted %d equal %v; want all %d bytes", n, bulk, err, counted, bytes.Equal(dst.Bytes(), data), len(data))
	}
}

func TestCopyStopsAtBulk(t *testing.T) {
	data := make([]byte, 1<<20)
	rand.Read(data)
	var dst bytes.Buffer
	src := &chunks{data: data, sizes: []int{64, 100}}
	n, bulk, err := Copy(&dst, src, nil, true)
	// Two small reads, then one that fills the small buffer: stop there,
	// with exactly what was read written.
	if err != nil || !bulk || n != 64+100+Small || !bytes.Equal(dst.Bytes(), data[:n]) {
		t.Fatalf("n %d bulk %v err %v; want bulk after %d bytes", n, bulk, err, 64+100+Small)
	}
	rest, _ := io.ReadAll(src)
	if len(rest) != len(data)-int(n) {
		t.Fatalf("the source lost data: %d left, want %d", len(rest), len(data)-int(n))
	}
}
