// Typesets the formulas that pymdownx.arithmatex (generic mode) leaves in each page,
// `<span class="arithmatex">\(...\)</span>` inline and `<div class="arithmatex">\[...\]</div>`
// displayed, with the KaTeX bundled in vendor/katex/ (mkdocs.yml loads it before this file), so a
// built site shows its maths with no network.
(function () {
  "use strict";

  // The TeX inside arithmatex's delimiters; an environment (\begin{...}) is kept whole.
  function texOf(text) {
    const tex = text.trim();
    const inline = tex.startsWith("\\(") && tex.endsWith("\\)");
    const display = tex.startsWith("\\[") && tex.endsWith("\\]");
    return inline || display ? tex.slice(2, -2) : tex;
  }

  function typesetAll() {
    for (const element of document.querySelectorAll(".arithmatex")) {
      // A formula KaTeX cannot parse is shown as its source, in red, instead of stopping the rest.
      katex.render(texOf(element.textContent), element, {
        displayMode: element.tagName !== "SPAN",
        throwOnError: false,
      });
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", typesetAll);
  } else {
    typesetAll();
  }
})();
