-- GET /Patient?family=FamK for a random K (see README.md).
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/Patient?family=Fam" .. math.random(100, 999))
end
