// Command markapp plays an app in an enrolled pod that tries to leave the
// mesh by carrying the proxy mark (0x539). The datapath tests build it for
// the native ABI and for GOARCH=386, whose setsockopt goes through the
// 32-bit compat entry that cgroup/setsockopt programs never see.
//
//	markapp -target ADDR:PORT [-how setsockopt|uring|none] [-wait]   TCP
//	markapp -target ADDR:PORT -udp [-how setsockopt|cmsg|none]  UDP
//	markapp -target A:P -raw-syn ip|packet [-dev D -dst-mac M]  send a hand-built SYN (IPv4)
//
// It prints "mark=<ok|error>" once the mark is set (or refused) and, with
// -wait, then waits for a line on stdin before connecting (a socket marked
// before the pod was enrolled). Then it prints "answer=<first line|error>".
// Only the standard library is used, so it builds in a second for any
// GOARCH.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"
	"unsafe"
)

const proxyMark = 0x539

func main() {
	target := flag.String("target", "", "address:port to connect or send to")
	how := flag.String("how", "setsockopt", "how to set the mark: setsockopt, uring (an io_uring socket command, 6.7+), cmsg (UDP only), none")
	udp := flag.Bool("udp", false, "send one UDP datagram instead of connecting")
	wait := flag.Bool("wait", false, "after marking, wait for a line on stdin before connecting")
	rawSyn := flag.String("raw-syn", "", "send one TCP SYN to -target, hand-built, through: ip (SOCK_RAW) or packet (AF_PACKET with PACKET_QDISC_BYPASS, on -dev to -dst-mac)")
	dev := flag.String("dev", "eth0", "device for -raw-syn packet")
	dstMAC := flag.String("dst-mac", "", "destination MAC for -raw-syn packet")
	flag.Parse()
	if *rawSyn != "" {
		report("answer", sendRawSyn(*rawSyn, *target, *dev, *dstMAC))
		return
	}
	ap, err := net.ResolveTCPAddr("tcp", *target)
	if err != nil {
		fail(err)
	}
	fam, sa := syscall.AF_INET, syscall.Sockaddr(&syscall.SockaddrInet4{Port: ap.Port})
	if ip4 := ap.IP.To4(); ip4 != nil {
		copy(sa.(*syscall.SockaddrInet4).Addr[:], ip4)
	} else {
		s6 := &syscall.SockaddrInet6{Port: ap.Port}
		copy(s6.Addr[:], ap.IP.To16())
		fam, sa = syscall.AF_INET6, s6
	}
	typ := syscall.SOCK_STREAM
	if *udp {
		typ = syscall.SOCK_DGRAM
	}
	fd, err := syscall.Socket(fam, typ, 0)
	if err != nil {
		fail(err)
	}
	defer syscall.Close(fd)
	tv := syscall.Timeval{Sec: 2}
	syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
	syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_SNDTIMEO, &tv)

	switch *how {
	case "setsockopt":
		report("mark", syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_MARK, proxyMark))
	case "uring":
		err := uringSetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_MARK, proxyMark)
		if errors.Is(err, errUnsupported) {
			fmt.Printf("mark=unsupported %v\n", err)
			return
		}
		report("mark", err)
	case "cmsg", "none":
		fmt.Println("mark=ok")
	default:
		fail(fmt.Errorf("unknown -how %q", *how))
	}
	if *wait {
		bufio.NewReader(os.Stdin).ReadString('\n')
	}
	if *udp {
		var oob []byte
		if *how == "cmsg" {
			oob = markCmsg()
		}
		if err := syscall.Sendmsg(fd, []byte("hello\n"), oob, sa, 0); err != nil {
			fmt.Printf("answer=error %v\n", err)
			return
		}
	} else if err := connect(fd, sa); err != nil {
		fmt.Printf("answer=error %v\n", err)
		return
	} else if _, err := syscall.Write(fd, []byte("hello\n")); err != nil {
		fmt.Printf("answer=error %v\n", err)
		return
	}
	buf := make([]byte, 512)
	n, err := readRetry(fd, buf)
	if err != nil || n == 0 {
		fmt.Printf("answer=error %v\n", err)
		return
	}
	line := string(buf[:n])
	for i, c := range line {
		if c == '\n' {
			line = line[:i]
			break
		}
	}
	fmt.Printf("answer=%s\n", line)
}

// connect connects with a deadline: SO_SNDTIMEO bounds a blocking connect.
// A socket with a timeout is not restarted after a signal (signal(7)), and
// the Go runtime signals its threads (preemption), so an interrupted
// connect is repeated: the kernel goes on connecting in the background and
// answers EALREADY until it is done, EISCONN once it is.
func connect(fd int, sa syscall.Sockaddr) error {
	done := make(chan error, 1)
	go func() {
		for {
			err := syscall.Connect(fd, sa)
			switch err {
			case syscall.EINTR, syscall.EALREADY:
				time.Sleep(time.Millisecond)
				continue
			case syscall.EISCONN:
				err = nil
			}
			done <- err
			return
		}
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(3 * time.Second):
		return fmt.Errorf("connect timed out")
	}
}

// readRetry reads once, repeating a read a signal interrupted (see connect).
func readRetry(fd int, buf []byte) (int, error) {
	for {
		n, err := syscall.Read(fd, buf)
		if err != syscall.EINTR {
			return n, err
		}
	}
}

// markCmsg is a SOL_SOCKET/SO_MARK control message: the mark for one
// datagram, set without setsockopt.
func markCmsg() []byte {
	b := make([]byte, syscall.CmsgSpace(4))
	h := (*syscall.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level = syscall.SOL_SOCKET
	h.Type = syscall.SO_MARK
	h.SetLen(syscall.CmsgLen(4))
	v := uint32(proxyMark)
	copy(b[syscall.CmsgLen(0):], []byte{byte(v), byte(v >> 8), byte(v >> 16), byte(v >> 24)})
	return b
}

func report(what string, err error) {
	if err != nil {
		fmt.Printf("%s=error %v\n", what, err)
		return
	}
	fmt.Printf("%s=ok\n", what)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "markapp:", err)
	os.Exit(2)
}
