//go:build linux

package ctl

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/authz"
	"github.com/ambpf/ambpf/pkg/discovery"
)

// DefaultProxyAdmin is the proxy's admin endpoint (ztunnel's port
// 15000, loopback of the proxy's network namespace: run ambpfctl in the
// proxy pod, or port-forward it, as istioctl ztunnel-config does).
const DefaultProxyAdmin = "http://127.0.0.1:15000"

// proxyUsage is the help of the proxy command.
const proxyUsage = `usage: ambpfctl proxy [--admin URL] [--json] VIEW
views (read from the proxy's admin endpoint /config_dump):
  workloads      every workload the proxy knows: namespace, name, addresses, node, protocol
  certificates   the pod identities' certificates: state, serial, validity
  config         the whole config dump (JSON)
  pod UID        one pod as the proxy sees it (workload, certificate, policies
                 that select it) next to the datapath's counters (agent inspect)
`

// configDump is the part of the proxy's /config_dump (pkg/proxy
// ConfigDump) the views read.
type configDump struct {
	Workloads     []discovery.Workload `json:"workloads"`
	Policies      []authz.Policy       `json:"policies"`
	RootNamespace string               `json:"rootNamespace"`
	Certificates  []struct {
		Identity  string `json:"identity"`
		State     string `json:"state"`
		CertChain []struct {
			SerialNumber   string `json:"serialNumber"`
			ValidFrom      string `json:"validFrom"`
			ExpirationTime string `json:"expirationTime"`
		} `json:"certChain"`
	} `json:"certificates"`
	WorkloadState map[string]struct {
		State string `json:"state"`
	} `json:"workloadState"`
}

func (c *CLI) proxy(ctx context.Context, client *agentapi.Client, pins pinReader, args []string) error {
	fs := c.flags("proxy")
	admin := fs.String("admin", DefaultProxyAdmin, "the proxy's admin endpoint")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usagef("proxy: no view given\n\n%s", proxyUsage)
	}
	view, rest := fs.Arg(0), fs.Args()[1:]
	if (view == "pod") != (len(rest) == 1) || len(rest) > 1 {
		return usagef("proxy %s: wrong arguments %q\n\n%s", view, rest, proxyUsage)
	}
	raw, err := fetchDump(ctx, *admin)
	if err != nil {
		return err
	}
	if view == "config" {
		_, err := c.cfg.Stdout.Write(raw)
		return err
	}
	var d configDump
	if err := json.Unmarshal(raw, &d); err != nil {
		return fmt.Errorf("proxy config dump: %w", err)
	}
	switch view {
	case "workloads":
		if *asJSON {
			return c.writeJSON(d.Workloads)
		}
		tw := tabwriter.NewWriter(c.cfg.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAMESPACE\tPOD NAME\tADDRESS\tNODE\tPROTOCOL")
		for _, w := range d.Workloads {
			ips := make([]string, len(w.IPs))
			for i, ip := range w.IPs {
				ips[i] = ip.String()
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", w.Namespace, w.Name, strings.Join(ips, ","), dash(w.Node), protocol(&w))
		}
		return tw.Flush()
	case "certificates":
		if *asJSON {
			return c.writeJSON(d.Certificates)
		}
		tw := tabwriter.NewWriter(c.cfg.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "IDENTITY\tSTATE\tSERIAL NUMBER\tNOT BEFORE\tNOT AFTER")
		for _, cd := range d.Certificates {
			serial, from, to := "-", "-", "-"
			if len(cd.CertChain) > 0 {
				serial, from, to = cd.CertChain[0].SerialNumber, cd.CertChain[0].ValidFrom, cd.CertChain[0].ExpirationTime
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", cd.Identity, cd.State, serial, from, to)
		}
		return tw.Flush()
	case "pod":
		return c.proxyPod(ctx, client, pins, &d, rest[0], *asJSON)
	}
	return usagef("proxy: unknown view %q\n\n%s", view, proxyUsage)
}

// podView is what "proxy pod UID --json" prints.
type podView struct {
	Workload    discovery.Workload `json:"workload"`
	State       string             `json:"state"`
	Identity    string             `json:"identity"`
	CertState   string             `json:"certState,omitempty"`
	CertExpires string             `json:"certExpires,omitempty"`
	Policies    []string           `json:"policies"`
}

func (c *CLI) proxyPod(ctx context.Context, client *agentapi.Client, pins pinReader, d *configDump, uid string, asJSON bool) error {
	i := slices.IndexFunc(d.Workloads, func(w discovery.Workload) bool { return w.UID == uid })
	if i < 0 {
		return fmt.Errorf("proxy: no workload with UID %s", uid)
	}
	w := d.Workloads[i]
	v := podView{Workload: w, State: d.WorkloadState[uid].State, Identity: w.Identity(trustDomainOf(d)), Policies: []string{}}
	for _, cd := range d.Certificates {
		if cd.Identity == v.Identity {
			v.CertState = cd.State
			if len(cd.CertChain) > 0 {
				v.CertExpires = cd.CertChain[0].ExpirationTime
			}
		}
	}
	for _, p := range d.Policies {
		if p.AppliesTo(d.RootNamespace, w.Namespace, w.Labels) {
			v.Policies = append(v.Policies, fmt.Sprintf("%s %s", p.ID(), cmp.Or(string(p.Spec.Action), "ALLOW")))
		}
	}
	if asJSON {
		return c.writeJSON(v)
	}
	out := c.cfg.Stdout
	fmt.Fprintf(out, "proxy view of pod %s (%s/%s)\n", uid, w.Namespace, w.Name)
	fmt.Fprintf(out, "  proxy state:  %s\n", dash(v.State))
	fmt.Fprintf(out, "  identity:     %s\n", v.Identity)
	fmt.Fprintf(out, "  certificate:  %s, expires %s\n", dash(v.CertState), dash(v.CertExpires))
	fmt.Fprintf(out, "  protocol:     %s\n", protocol(&w))
	fmt.Fprintf(out, "  policies:     %s\n", dash(strings.Join(v.Policies, "; ")))
	fmt.Fprintln(out)
	// The datapath's side comes from the agent; in the proxy's pod there
	// is none, which is said rather than failing the proxy view.
	if err := c.inspect(ctx, client, pins, []string{uid}); err != nil {
		fmt.Fprintf(out, "datapath: not available here (%v)\n", err)
	}
	return nil
}

// trustDomainOf is the trust domain the dump's certificates use, read
// from a SPIFFE identity ("" when none: the default).
func trustDomainOf(d *configDump) string {
	for _, cd := range d.Certificates {
		if rest, ok := strings.CutPrefix(cd.Identity, "spiffe://"); ok {
			td, _, _ := strings.Cut(rest, "/")
			return td
		}
	}
	return ""
}

func protocol(w *discovery.Workload) string {
	return cmp.Or(string(w.Protocol), string(discovery.ProtocolTCP))
}

func dash(s string) string { return cmp.Or(s, "-") }

// fetchDump reads admin's /config_dump.
func fetchDump(ctx context.Context, admin string) ([]byte, error) {
	u, err := url.JoinPath(admin, "/config_dump")
	if err != nil {
		return nil, usagef("proxy: --admin %q: %v", admin, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("proxy admin endpoint: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("proxy admin endpoint: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("proxy admin endpoint: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
}
