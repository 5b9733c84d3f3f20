//go:build linux

package agentapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
)

// Client calls the agent over its unix socket. It is safe for concurrent
// use.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the agent listening on socket
// (DefaultSocket when empty). It does not connect until a call.
func NewClient(socket string) *Client {
	if socket == "" {
		socket = DefaultSocket
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		// A CNI plugin makes one or two calls and exits; keeping idle
		// connections buys nothing.
		DisableKeepAlives: true,
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr}}
}

// Socket is the socket path the client calls.
func (c *Client) Socket() string { return c.socket }

// Enroll enrols a pod and returns its state once the datapath is attached
// (StateEnabled, or StatePending while no proxy took it).
func (c *Client) Enroll(ctx context.Context, req EnrollRequest) (PodState, error) {
	var st PodState
	err := c.do(ctx, http.MethodPost, "/v1/pods", req, &st)
	return st, err
}

// Unenroll removes a pod. An unknown pod gives an error for which
// IsNotFound is true.
func (c *Client) Unenroll(ctx context.Context, uid string) error {
	return c.do(ctx, http.MethodDelete, "/v1/pods/"+url.PathEscape(uid), nil, nil)
}

// Pods lists the enrolled pods.
func (c *Client) Pods(ctx context.Context) ([]PodState, error) {
	var out []PodState
	err := c.do(ctx, http.MethodGet, "/v1/pods", nil, &out)
	return out, err
}

// Pod returns one pod in detail.
func (c *Client) Pod(ctx context.Context, uid string) (PodStatus, error) {
	var out PodStatus
	err := c.do(ctx, http.MethodGet, "/v1/pods/"+url.PathEscape(uid), nil, &out)
	return out, err
}

// Status returns the agent's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var out Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, &out)
	return out, err
}

// do sends one request. Transport failures are wrapped with the socket
// path; an error answer is returned as *Error.
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	// The host part is ignored: the transport always dials the socket.
	req, err := http.NewRequestWithContext(ctx, method, "http://agent"+path, body)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("call agent at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("read agent answer to %s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		e := &Error{HTTPStatus: resp.StatusCode}
		if json.Unmarshal(data, e) != nil || e.Message == "" {
			e.Message = fmt.Sprintf("agent answered %s: %s", resp.Status, bytes.TrimSpace(data))
			e.Code = CodeInternal
		}
		return e
	}
	if out == nil || resp.StatusCode == http.StatusNoContent {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("decode agent answer to %s %s: %w", method, path, err)
	}
	return nil
}
