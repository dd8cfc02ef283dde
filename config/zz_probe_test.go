package config

import (
	"fmt"
	"path/filepath"
	"testing"
)

func TestZZProbe(t *testing.T) {
	const prov = "[providers.p]\ntype = \"nuapay\"\nbase_url = \"https://nuapay.example\"\n"
	const m = "[merchants.acme]\nprovider = \"p\"\norganisation = \"org-acme\"\nscopes = [\"s\"]\n"
	for _, tc := range []string{
		prov + "api_key = \"sk-DISTINCTIVE\n" + m,
		prov + "api_key = \"sk-DISTINCTIVE\"\"\n" + m,
		prov + "api_key = 'sk-DISTINCTIVE\n" + m,
		prov + "api_key = \"\"\"sk-DISTINCTIVE\n" + m,
		prov + "api_key = \"{env.NUAPAY_API_KEY}\" sk-DISTINCTIVE\n" + m,
		prov + "api_key = [\"sk-DISTINCTIVE\"]\n" + m,
		prov + "api_key = { v = \"sk-DISTINCTIVE\" }\n" + m,
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\napi_key = \"sk-DISTINCTIVE\"\n" + m,
		prov + "\"api_key\" = sk-DISTINCTIVE\n" + m,
		prov + "api_key= sk-DISTINCTIVE\n" + m,
		prov + "api_key = \"sk-DISTINCTIVE\\q\"\n" + m,
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\n" + m + "organisation = \"x\"\n",
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\n" + m + "token_lifetime = 90\n",
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\n" + m + "scopes2 = [\"x\"]\n",
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\n" + "[merchants.\"café\"]\nprovider = \"p\"\norganisation = \"o\"\nscopes = [\"s\"]\n",
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\n" + "[merchants.acme]\nprovider = \"p\"\norganisation = \"o\"\nscopes = \"s\"\n",
		prov + "api_key = \"{file.missing.key}\"\n" + m,
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\ntoken_lifetime = \"5s\"\n" + m,
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\ntoken_lifetime = \"1.5e3s\"\n" + m,
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\n" + m + "token_lifetime = \"-1s\"\n",
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\n" + m + "token_lifetime = \"10500ms\"\n",
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\n[providers.p.tls]\nclient_key = sk-DISTINCTIVE\n" + m,
		prov + "api_key = \"{env.NUAPAY_API_KEY}\"\n[merchants]\nacme = { provider = \"p\", organisation = \"o\", scopes = [\"s\"] }\nacme.audience = \"x\"\n",
	} {
		reg, err := parse(filepath.Join(t.TempDir(), "merchants.toml"), []byte(tc), testEnv())
		fmt.Printf("=== %q\n%v %v\n", tc[len(prov):], reg != nil, err)
	}
}
