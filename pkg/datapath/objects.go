package datapath

import (
	"errors"
	"fmt"
	"maps"

	"github.com/cilium/ebpf"
)

// DefaultMapSize is how many sockets sock_hash holds unless told otherwise:
// two per accelerated connection.
const DefaultMapSize = 65536

// objects are the loaded programs and maps of one datapath.
type objects struct {
	sockops  sockopsObjects
	redirect redirectObjects
	sockopt  sockoptObjects
}

// maps are the datapath's maps, by name; all of them are pinned.
func (o *objects) maps() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{
		"sock_hash":         o.sockops.SockHash,
		"sock_states":       o.sockops.SockStates,
		"local_addrs":       o.sockops.LocalAddrs,
		"counters":          o.sockops.Counters,
		"settings":          o.sockops.Settings,
		"pending":           o.sockops.Pending,
		"policy_ports":      o.sockops.PolicyPorts,
		"policy_cidrs":      o.sockops.PolicyCidrs,
		"tuning_rules":      o.sockops.TuningRules,
		"refusals":          o.sockops.Refusals,
		"refusal_gen":       o.sockops.RefusalGen,
		"refusing_ports":    o.sockops.RefusingPorts,
		"cleared_ports":     o.sockops.ClearedPorts,
		"probation_sockets": o.sockops.ProbationSockets,
	}
}

func (o *objects) Close() error {
	return errors.Join(o.sockops.Close(), o.redirect.Close(), o.sockopt.Close())
}

// loadObjects loads the programs that `up` attaches. Maps in reuse (by name) are used instead of
// new ones, which is how an upgrade keeps the sockets of running connections.
func loadObjects(mapSize uint32, reuse map[string]*ebpf.Map) (*objects, error) {
	sockopsSpec, err := loadSockops()
	if err != nil {
		return nil, err
	}
	redirectSpec, err := loadRedirect()
	if err != nil {
		return nil, err
	}
	sockoptSpec, err := loadSockopt()
	if err != nil {
		return nil, err
	}
	if mapSize == 0 {
		return nil, errors.New("the sockhash size must be at least 1")
	}
	sockopsSpec.Maps["sock_hash"].MaxEntries = mapSize
	if reuse["sock_hash"] == nil {
		// Made on its own, so that a size the kernel refuses is named.
		sockHash, err := ebpf.NewMap(sockopsSpec.Maps["sock_hash"])
		if err != nil {
			return nil, fmt.Errorf("creating a sockhash of %d sockets: %w: choose a smaller --map-size", mapSize, err)
		}
		defer sockHash.Close() // the objects hold a clone
		withSockHash := map[string]*ebpf.Map{"sock_hash": sockHash}
		maps.Copy(withSockHash, reuse)
		reuse = withSockHash
	}

	o := &objects{}
	if err := loadWithMaps(sockopsSpec, &o.sockops, reuse); err != nil {
		return nil, fmt.Errorf("loading the sock_ops program: %w", verifierError(err))
	}
	if err := loadWithMaps(redirectSpec, &o.redirect, o.maps()); err != nil {
		o.sockops.Close()
		return nil, fmt.Errorf("loading the sk_msg program: %w", verifierError(err))
	}
	if err := loadWithMaps(sockoptSpec, &o.sockopt, o.maps()); err != nil {
		o.sockops.Close()
		o.redirect.Close()
		return nil, fmt.Errorf("loading the setsockopt program: %w", verifierError(err))
	}
	return o, nil
}

// loadWithMaps loads spec into objs using those of the given maps that it
// has instead of new ones. The spec adopts their sizes: a map's size is set
// when it is created.
func loadWithMaps(spec *ebpf.CollectionSpec, objs any, maps map[string]*ebpf.Map) error {
	replacements := make(map[string]*ebpf.Map)
	for name, m := range maps {
		if ms := spec.Maps[name]; ms != nil {
			ms.MaxEntries = m.MaxEntries()
			replacements[name] = m
		}
	}
	return spec.LoadAndAssign(objs, &ebpf.CollectionOptions{MapReplacements: replacements})
}

// verifierError keeps the end of a verifier log, where the reason is, instead
// of the whole log.
func verifierError(err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("%+v", ve)
	}
	return err
}
