// Command testapp is the application the real-node end-to-end tests run in
// pods. Subcommands:
//
//	testapp serve [--http :8080] [--tcp :9090]
//	    HTTP: GET / answers "peer=<client IP> host=<hostname>", /healthz "ok".
//	    TCP: every connection gets "peer=<client IP>\n" and is closed.
//	    Both report the address the connection really came from, so a test
//	    sees whether the mesh kept the client's IP.
//	testapp get URL
//	    GET URL (5 s timeout), print the body; exit 1 on any failure.
//	testapp mark [VALUE]
//	    setsockopt(SO_MARK, VALUE, default 0x539) on a new TCP socket;
//	    prints "ok" (exit 0) or the errno name, e.g. "EPERM" (exit 3).
//	testapp loop URL [DURATION] [INTERVAL]
//	    GET URL on a new connection every INTERVAL (default 100ms) for
//	    DURATION (default 2m; "stdin": until stdin closes, for a caller
//	    holding kubectl exec -i) or until signalled; prints "ok" or
//	    "fail <error>" per request as it goes, then "total ok=N fail=M".
//	testapp sleep
//	    sleep until signalled (a pod that only hosts kubectl exec).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: testapp serve|get|mark|sleep")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "get":
		err = get(os.Args[2:])
	case "loop":
		err = loop(os.Args[2:])
	case "mark":
		os.Exit(mark(os.Args[2:]))
	case "sleep":
		waitSignal()
	default:
		err = fmt.Errorf("unknown subcommand %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "testapp:", err)
		os.Exit(1)
	}
}

func waitSignal() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}

func peerIP(addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return host
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	httpAddr := fs.String("http", ":8080", "HTTP listen address")
	tcpAddr := fs.String("tcp", ":9090", "TCP listen address")
	if err := fs.Parse(args); err != nil {
		return err
	}
	host, _ := os.Hostname()
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "peer=%s host=%s\n", peerIP(r.RemoteAddr), host)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	hl, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", *httpAddr, err)
	}
	tl, err := net.Listen("tcp", *tcpAddr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", *tcpAddr, err)
	}
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "peer=%s\n", peerIP(c.RemoteAddr().String()))
			c.Close()
		}
	}()
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { waitSignal(); srv.Close(); tl.Close() }()
	if err := srv.Serve(hl); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func get(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: testapp get URL")
	}
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(args[0])
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("read body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %s: %s", resp.Status, body)
	}
	os.Stdout.Write(body)
	return nil
}

func mark(args []string) int {
	v := int64(0x539)
	if len(args) > 0 {
		p, err := strconv.ParseInt(args[0], 0, 32)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testapp mark:", err)
			return 2
		}
		v = p
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testapp mark: socket:", err)
		return 2
	}
	defer syscall.Close(fd)
	err = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_MARK, int(v))
	var errno syscall.Errno
	switch {
	case err == nil:
		fmt.Println("ok")
		return 0
	case errors.As(err, &errno) && errno == syscall.EPERM:
		fmt.Println("EPERM")
		return 3
	default:
		fmt.Println(err)
		return 4
	}
}

func loop(args []string) error {
	if len(args) < 1 || len(args) > 3 {
		return errors.New("usage: testapp loop URL [DURATION] [INTERVAL]")
	}
	dur, every := 2*time.Minute, 100*time.Millisecond
	var err error
	stdinClosed := make(chan struct{})
	if len(args) > 1 && args[1] == "stdin" {
		dur = 24 * time.Hour
		go func() { io.Copy(io.Discard, os.Stdin); close(stdinClosed) }()
	} else if len(args) > 1 {
		if dur, err = time.ParseDuration(args[1]); err != nil {
			return err
		}
	}
	if len(args) > 2 {
		if every, err = time.ParseDuration(args[2]); err != nil {
			return err
		}
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	// A new connection per request: each one is captured and proxied
	// anew, so a rollout's gap shows as failed requests.
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	end := time.After(dur)
	tick := time.NewTicker(every)
	defer tick.Stop()
	ok, fail := 0, 0
	for {
		select {
		case <-end:
			fmt.Printf("total ok=%d fail=%d\n", ok, fail)
			return nil
		case <-stop:
			fmt.Printf("total ok=%d fail=%d\n", ok, fail)
			return nil
		case <-stdinClosed:
			fmt.Printf("total ok=%d fail=%d\n", ok, fail)
			return nil
		case <-tick.C:
		}
		resp, err := c.Get(args[0])
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				err = fmt.Errorf("status %s", resp.Status)
			}
		}
		if err != nil {
			fail++
			fmt.Println("fail", err)
		} else {
			ok++
			fmt.Println("ok")
		}
	}
}
