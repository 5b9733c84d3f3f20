//go:build linux

package cniplugin

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/ambpf/ambpf/pkg/agentapi"
)

// PluginType is the "type" the plugin is configured as.
const PluginType = "ambpf-cni"

// defaultServiceAccount is what Kubernetes gives a pod that names none.
const defaultServiceAccount = "default"

// NetConf is the plugin's configuration, one entry of a conflist.
type NetConf struct {
	types.NetConf
	// AgentSocket is the agent's API socket; agentapi.DefaultSocket when
	// empty.
	AgentSocket string `json:"agent_socket,omitempty"`
	// Pod names the pod when the runtime passes no Kubernetes CNI_ARGS
	// (standalone use); CNI_ARGS win when present.
	Pod           PodConf `json:"pod,omitempty"`
	DNSCapture    bool    `json:"dns_capture,omitempty"`
	BypassInbound bool    `json:"bypass_inbound,omitempty"`
}

// PodConf is the pod identity given in the configuration.
type PodConf struct {
	UID            string `json:"uid,omitempty"`
	Name           string `json:"name,omitempty"`
	Namespace      string `json:"namespace,omitempty"`
	ServiceAccount string `json:"service_account,omitempty"`
}

// ParseConfig decodes the plugin's stdin configuration and its previous
// result, if any.
func ParseConfig(stdin []byte) (*NetConf, error) {
	var conf NetConf
	if err := json.Unmarshal(stdin, &conf); err != nil {
		return nil, fmt.Errorf("parse %s config: %w", PluginType, err)
	}
	if conf.Type != PluginType {
		return nil, fmt.Errorf("parse %s config: type is %q, want %q", PluginType, conf.Type, PluginType)
	}
	if err := version.ParsePrevResult(&conf.NetConf); err != nil {
		return nil, fmt.Errorf("parse %s config: prevResult: %w", PluginType, err)
	}
	if conf.AgentSocket == "" {
		conf.AgentSocket = agentapi.DefaultSocket
	}
	return &conf, nil
}

// podArgs are the Kubernetes keys of CNI_ARGS.
type podArgs struct {
	UID, Name, Namespace string
}

// parseArgs reads CNI_ARGS ("K1=v1;K2=v2"). Unknown keys are ignored
// whether or not IgnoreUnknown is set: runtimes pass keys this plugin has
// no use for (K8S_POD_INFRA_CONTAINER_ID), and refusing them helps nobody.
func parseArgs(args string) (podArgs, error) {
	var out podArgs
	if args == "" {
		return out, nil
	}
	for _, pair := range strings.Split(args, ";") {
		if pair == "" {
			continue
		}
		k, v, ok := strings.Cut(pair, "=")
		if !ok || k == "" {
			return out, fmt.Errorf("CNI_ARGS: %q is not KEY=VALUE", pair)
		}
		switch k {
		case "K8S_POD_UID":
			out.UID = v
		case "K8S_POD_NAME":
			out.Name = v
		case "K8S_POD_NAMESPACE":
			out.Namespace = v
		}
	}
	return out, nil
}

// identity is the pod's identity: CNI_ARGS first, then the configuration;
// the service account defaults to "default". Only the UID is checked here
// (every command needs it); the agent validates the rest.
func identity(conf *NetConf, cniArgs string) (agentapi.EnrollRequest, error) {
	args, err := parseArgs(cniArgs)
	if err != nil {
		return agentapi.EnrollRequest{}, err
	}
	first := func(vals ...string) string {
		for _, v := range vals {
			if v != "" {
				return v
			}
		}
		return ""
	}
	req := agentapi.EnrollRequest{
		UID:            first(args.UID, conf.Pod.UID),
		Name:           first(args.Name, conf.Pod.Name),
		Namespace:      first(args.Namespace, conf.Pod.Namespace),
		ServiceAccount: first(conf.Pod.ServiceAccount, defaultServiceAccount),
		DNSCapture:     conf.DNSCapture,
		BypassInbound:  conf.BypassInbound,
	}
	if req.UID == "" {
		return req, errors.New("no pod UID: the runtime passed no K8S_POD_UID in CNI_ARGS and the config has no pod.uid")
	}
	return req, nil
}

// prevIPs returns the pod's addresses from the previous plugin's result.
func prevIPs(conf *NetConf) ([]netip.Addr, error) {
	if conf.PrevResult == nil {
		return nil, fmt.Errorf("%s is a chained plugin: it needs a prevResult (put it after the plugin that sets up the pod network)", PluginType)
	}
	res, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, fmt.Errorf("convert prevResult: %w", err)
	}
	var ips []netip.Addr
	for _, ip := range res.IPs {
		a, ok := netip.AddrFromSlice(ip.Address.IP)
		if !ok {
			return nil, fmt.Errorf("prevResult: bad address %v", ip.Address.IP)
		}
		ips = append(ips, a.Unmap())
	}
	return ips, nil
}
