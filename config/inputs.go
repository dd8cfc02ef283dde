package config

import (
	"cmp"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"os"
	"slices"
)

// Input is one thing a registry read besides its own files: an
// environment variable or a file that an entry names (a {file.PATH}
// secret, a TLS certificate, key or CA file, a private_key).
type Input struct {
	// Kind is "env" or "file".
	Kind string
	// Name is the variable's name or the file's absolute path.
	Name string

	// sum identifies what was read: a keyed hash of the value or the
	// content (the key of SecretVersion: no oracle for a secret), "" when
	// the variable was unset or the file could not be read.
	sum string
}

// Input kinds.
const (
	InputEnv  = "env"
	InputFile = "file"
)

// inputs records what a parser read, by kind and name.
type inputs map[[2]string]string

// read records an input; the first read of a name is kept.
func (in *inputs) read(kind, name string, value []byte, ok bool) {
	if _, seen := (*in)[[2]string{kind, name}]; !seen {
		in.add(inputs{{kind, name}: inputSum(value, ok)})
	}
}

// add records the inputs of other; the first read of a name is kept.
func (in *inputs) add(other inputs) {
	for k, sum := range other {
		if *in == nil {
			*in = inputs{}
		}
		if _, seen := (*in)[k]; !seen {
			(*in)[k] = sum
		}
	}
}

// list returns the inputs sorted by kind and name.
func (in inputs) list() []Input {
	keys := slices.SortedFunc(maps.Keys(in), func(a, b [2]string) int {
		return cmp.Or(cmp.Compare(a[0], b[0]), cmp.Compare(a[1], b[1]))
	})
	out := make([]Input, len(keys))
	for i, k := range keys {
		out[i] = Input{Kind: k[0], Name: k[1], sum: in[k]}
	}
	return out
}

func inputSum(value []byte, ok bool) string {
	if !ok {
		return ""
	}
	m := hmac.New(sha256.New, secretVersionKey)
	m.Write(value)
	return hex.EncodeToString(m.Sum(nil))
}

// lookupEnv reads an environment variable and records it.
func (p *parser) lookupEnv(name string) (string, bool) {
	v, ok := p.opts.LookupEnv(name)
	p.inputs.read(InputEnv, name, []byte(v), ok)
	return v, ok
}

// readFile reads a file a registry entry names (see readFile) and records
// it.
func (p *parser) readFile(path string, max int64) ([]byte, error) {
	b, err := readFile(path, max)
	p.inputs.read(InputFile, path, b, err == nil)
	return b, err
}

// Inputs lists what the registry read besides its files (Files): the
// environment variables and the files its entries name, sorted by kind
// and name. See Changed.
func (r *Registry) Inputs() []Input { return r.inputs.list() }

// Inputs lists the environment variables the file's merchants read. See
// Changed.
func (f *File) Inputs() []Input { return f.inputs.list() }

// Changed reports whether one of the inputs reads differently now: a
// variable set, unset or changed, a file changed, gone or come.
// lookupEnv reads the variables (os.LookupEnv when nil).
func Changed(in []Input, lookupEnv func(string) (string, bool)) bool {
	if lookupEnv == nil {
		lookupEnv = os.LookupEnv
	}
	for _, i := range in {
		var sum string
		switch i.Kind {
		case InputEnv:
			v, ok := lookupEnv(i.Name)
			sum = inputSum([]byte(v), ok)
		default:
			b, err := readFile(i.Name, maxTLSFile)
			sum = inputSum(b, err == nil)
		}
		if sum != i.sum {
			return true
		}
	}
	return false
}
