// Command render executes a Go text/template as Ollama executes a Modelfile TEMPLATE, for the
// template parity tests (tests/test_ollama_template.py). Standard library only:
//
//	echo '{"template": "{{ range .Messages }}{{ .Content }}{{ end }}", "data": {"Messages": []}}' | go run tests/go_template/render.go
//
// It prints the rendering on stdout; a template that does not parse or execute exits 1 with the
// error on stderr.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

type request struct {
	Template string         `json:"template"`
	Data     map[string]any `json:"data"`
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fail("reading the request", err)
	}
	// No extra functions: the template must use Go's builtins only. missingkey=error (Ollama uses
	// zero) so that a template naming a field Ollama does not pass fails here instead of printing "".
	tmpl, err := template.New("TEMPLATE").Option("missingkey=error").Parse(req.Template)
	if err != nil {
		fail("parsing the template", err)
	}
	var out bytes.Buffer // written only when complete: no partial rendering on an error
	if err := tmpl.Execute(&out, req.Data); err != nil {
		fail("executing the template", err)
	}
	os.Stdout.Write(out.Bytes())
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
	os.Exit(1)
}
