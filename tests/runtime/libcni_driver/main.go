// Command libcni-driver drives a CNI conflist through libcni, the library every CNI runtime embeds, so that
// the runtime tests can exercise the commands containerd 1.6 never sends (CHECK, GC, STATUS).
//
//	libcni-driver -conflist F -bin-dir D -cache-dir C [-netns P -container-id ID -ifname IF -args K=V;...]
//	              [-keep ID@IF,...] add|check|del|gc|status
//
// add, check and del go through libcni's AddNetworkList / CheckNetworkList / DelNetworkList, with its result
// cache in -cache-dir (the prevResult that CHECK and DEL replay comes from there, as in a real runtime).
// The packaged libcni (1.1.x) predates GC and STATUS (spec 1.1.0), so gc and status are sent the way libcni
// 1.2 does it, through libcni's invoke package: to every plugin of the list in order, at cniVersion 1.1.0,
// skipping plugins whose VERSION answer does not include 1.1.0 (the reference plugins here stop at 1.0.0);
// gc passes -keep as "cni.dev/attachments".
//
// Output: one JSON object on stdout, {"ok": true, "result": <ADD result or null>} or
// {"ok": false, "code": N, "msg": "...", "details": "..."} with the CNI error of the failing plugin; the exit
// status is 0 when ok, 1 for a CNI error and 2 for a usage or driver error (message on stderr).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
)

const gcStatusVersion = "1.1.0"

type attachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifname"`
}

type outcome struct {
	OK      bool            `json:"ok"`
	Result  json.RawMessage `json:"result,omitempty"`
	Code    uint            `json:"code,omitempty"`
	Msg     string          `json:"msg,omitempty"`
	Details string          `json:"details,omitempty"`
}

func main() {
	conflistPath := flag.String("conflist", "", "conflist file")
	binDir := flag.String("bin-dir", "", "CNI plugin directory (colon-separated list allowed)")
	cacheDir := flag.String("cache-dir", "", "libcni result cache directory")
	netns := flag.String("netns", "", "network namespace path (add, check, del)")
	containerID := flag.String("container-id", "", "container ID")
	ifName := flag.String("ifname", "eth0", "interface name")
	cniArgs := flag.String("args", "", "CNI_ARGS, K=V pairs separated by ';'")
	keep := flag.String("keep", "", "gc: attachments to keep, ID@IFNAME separated by ','")
	flag.Parse()
	if flag.NArg() != 1 || *conflistPath == "" || *binDir == "" || *cacheDir == "" {
		usage("need -conflist, -bin-dir, -cache-dir and one command (add, check, del, gc, status)")
	}
	list, err := libcni.ConfListFromFile(*conflistPath)
	if err != nil {
		usage(fmt.Sprintf("reading %s: %v", *conflistPath, err))
	}
	paths := strings.Split(*binDir, ":")
	cni := libcni.NewCNIConfigWithCacheDir(paths, *cacheDir, nil)
	runtime := &libcni.RuntimeConf{ContainerID: *containerID, NetNS: *netns, IfName: *ifName}
	for _, pair := range strings.Split(*cniArgs, ";") {
		if pair == "" {
			continue
		}
		key, value, found := strings.Cut(pair, "=")
		if !found {
			usage(fmt.Sprintf("-args entry %q is not K=V", pair))
		}
		runtime.Args = append(runtime.Args, [2]string{key, value})
	}
	ctx := context.Background()

	var result json.RawMessage
	switch command := flag.Arg(0); command {
	case "add":
		var added types.Result
		added, err = cni.AddNetworkList(ctx, list, runtime)
		if err == nil {
			result, err = json.Marshal(added)
		}
	case "check":
		err = cni.CheckNetworkList(ctx, list, runtime)
	case "del":
		err = cni.DelNetworkList(ctx, list, runtime)
	case "gc":
		var attachments []attachment
		attachments, err = parseKeep(*keep)
		if err != nil {
			usage(err.Error())
		}
		err = eachModernPlugin(ctx, list, paths, runtime, "GC", map[string]interface{}{"cni.dev/attachments": attachments})
	case "status":
		err = eachModernPlugin(ctx, list, paths, runtime, "STATUS", nil)
	default:
		usage(fmt.Sprintf("unknown command %q", command))
	}
	report(result, err)
}

// eachModernPlugin sends command at cniVersion 1.1.0 to each plugin of the list that supports that version.
func eachModernPlugin(ctx context.Context, list *libcni.NetworkConfigList, paths []string, runtime *libcni.RuntimeConf,
	command string, extra map[string]interface{}) error {
	for _, plugin := range list.Plugins {
		pluginPath, err := invoke.FindInPath(plugin.Network.Type, paths)
		if err != nil {
			return err
		}
		info, err := invoke.GetVersionInfo(ctx, pluginPath, nil)
		if err != nil {
			return err
		}
		if !contains(info.SupportedVersions(), gcStatusVersion) {
			continue
		}
		var conf map[string]interface{}
		if err := json.Unmarshal(plugin.Bytes, &conf); err != nil {
			return err
		}
		conf["name"] = list.Name
		conf["cniVersion"] = gcStatusVersion
		for key, value := range extra {
			conf[key] = value
		}
		stdin, err := json.Marshal(conf)
		if err != nil {
			return err
		}
		args := &invoke.Args{Command: command, ContainerID: runtime.ContainerID, NetNS: runtime.NetNS,
			IfName: runtime.IfName, PluginArgs: runtime.Args, Path: strings.Join(paths, ":")}
		if err := invoke.ExecPluginWithoutResult(ctx, pluginPath, stdin, args, nil); err != nil {
			return err
		}
	}
	return nil
}

func parseKeep(text string) ([]attachment, error) {
	attachments := []attachment{}
	for _, item := range strings.Split(text, ",") {
		if item == "" {
			continue
		}
		id, ifName, found := strings.Cut(item, "@")
		if !found {
			return nil, fmt.Errorf("-keep entry %q is not ID@IFNAME", item)
		}
		attachments = append(attachments, attachment{ContainerID: id, IfName: ifName})
	}
	return attachments, nil
}

func contains(items []string, wanted string) bool {
	for _, item := range items {
		if item == wanted {
			return true
		}
	}
	return false
}

func report(result json.RawMessage, err error) {
	encoder := json.NewEncoder(os.Stdout)
	if err == nil {
		_ = encoder.Encode(outcome{OK: true, Result: result})
		os.Exit(0)
	}
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		_ = encoder.Encode(outcome{Code: cniErr.Code, Msg: cniErr.Msg, Details: cniErr.Details})
		os.Exit(1)
	}
	_ = encoder.Encode(outcome{Code: 0, Msg: err.Error()})
	os.Exit(1)
}

func usage(message string) {
	fmt.Fprintln(os.Stderr, "libcni-driver:", message)
	os.Exit(2)
}
